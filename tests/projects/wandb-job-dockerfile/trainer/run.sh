echo "built from the job's own Dockerfile"
ls /job
