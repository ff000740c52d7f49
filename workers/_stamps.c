/* The tree index's stamp check in C: one lstat per remembered path, compared with the
 * stamp the walk saw, without the GIL and on a few threads (a cache hit is mostly these
 * syscalls; see TreeIndex in workers/context.py, which keeps the Python check beside it).
 *
 * unchanged(paths, records, threads) -> bool
 *
 *   paths    bytes: the fs-encoded paths, each followed by a NUL.
 *   records  bytes: one record per path, native byte order (see Record).
 *   threads  how many threads check the paths (1 = the calling thread only).
 *
 * True when every path's lstat has the remembered (mode, inode, device, size, mtime ns,
 * ctime ns); False at the first difference or error (a vanished path, EACCES, ...): the
 * caller then walks the tree as if it had never seen it. Malformed arguments raise.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* One remembered entry: where its path starts in `paths`, and its stamp. The Python side
 * packs it with struct format "=qQQQqqq" (workers/context.py _STAMP_RECORD), 56 bytes, no
 * padding; RECORD_SIZE lets a test check that the two agree. */
typedef struct {
    int64_t offset;
    uint64_t mode, ino, dev;
    int64_t size, mtime_ns, ctime_ns;
} Record;

/* Threads beyond this buy nothing for a syscall-bound loop on any machine we run on. */
#define MAX_THREADS 64

/* Paths a thread takes from the shared queue at a time: enough to keep a parent directory
 * open across several of its entries, few enough that the threads end together. */
#define BATCH 128

/* What the threads share. A thread takes the next BATCH paths until none are left, rather
 * than a fixed share: a thread that starts late (a virtual CPU woken from idle can take
 * milliseconds to run it) then costs nothing, as the others take its share. */
typedef struct {
    const char *paths;
    const char *records; /* not aligned: records are copied out with memcpy */
    Py_ssize_t count;
    Py_ssize_t next;      /* the first path no thread has taken yet */
    int changed;          /* set by whichever thread sees a difference first */
} Work;

/* sec * 1e9 + nsec as Python's st_*_time_ns has it; 0 when it does not fit (year > 2262). */
static int time_ns(const struct timespec *ts, int64_t *out) {
    int64_t ns;
    if (__builtin_mul_overflow((int64_t)ts->tv_sec, (int64_t)1000000000, &ns))
        return 0;
    return !__builtin_add_overflow(ns, (int64_t)ts->tv_nsec, out);
}

/* The directory a chunk's paths are looked up in: consecutive paths mostly share their
 * parent, and an lstat relative to an open directory skips resolving every component of
 * the path again (about a fifth of a check's time, measured by bench/stamps_bench.py). */
typedef struct {
    int fd; /* -1: none open */
    size_t len;
    char path[PATH_MAX];
} Parent;

/* lstat(path), relative to the parent kept in `parent` (opened when it changes). */
static int lstat_in(Parent *parent, const char *path, struct stat *st) {
    const char *slash = strrchr(path, '/');
    size_t len = slash != NULL ? (size_t)(slash - path) : 0;
    if (slash == NULL || len == 0 || len >= sizeof parent->path)
        return lstat(path, st); /* relative, directly under /, or too long: no shortcut */
    if (parent->fd < 0 || parent->len != len || memcmp(parent->path, path, len) != 0) {
        if (parent->fd >= 0)
            close(parent->fd);
        memcpy(parent->path, path, len);
        parent->path[len] = '\0';
        parent->len = len;
        /* O_NOFOLLOW: a directory replaced by a symlink fails (its own stamp changed too). */
        parent->fd = open(parent->path, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (parent->fd < 0)
            return -1;
    }
    return fstatat(parent->fd, slash + 1, st, AT_SYMLINK_NOFOLLOW);
}

static int same_stamp(Parent *parent, const char *path, const Record *want) {
    struct stat st;
    int64_t mtime_ns, ctime_ns;
    if (lstat_in(parent, path, &st) != 0)
        return 0;
    if (!time_ns(&st.st_mtim, &mtime_ns) || !time_ns(&st.st_ctim, &ctime_ns))
        return 0;
    return (uint64_t)st.st_mode == want->mode && (uint64_t)st.st_ino == want->ino
        && (uint64_t)st.st_dev == want->dev && (int64_t)st.st_size == want->size
        && mtime_ns == want->mtime_ns && ctime_ns == want->ctime_ns;
}

static void *check_paths(void *arg) {
    Work *work = arg;
    Record record;
    Parent parent = {.fd = -1};
    for (;;) {
        Py_ssize_t begin = __atomic_fetch_add(&work->next, BATCH, __ATOMIC_RELAXED);
        if (begin >= work->count)
            break;
        Py_ssize_t end = begin + BATCH < work->count ? begin + BATCH : work->count;
        for (Py_ssize_t i = begin; i < end; i++) {
            /* Another thread's difference settles the answer: stop early. */
            if (__atomic_load_n(&work->changed, __ATOMIC_RELAXED))
                goto out;
            memcpy(&record, work->records + i * (Py_ssize_t)sizeof(Record), sizeof(Record));
            if (!same_stamp(&parent, work->paths + record.offset, &record)) {
                __atomic_store_n(&work->changed, 1, __ATOMIC_RELAXED);
                goto out;
            }
        }
    }
out:
    if (parent.fd >= 0)
        close(parent.fd);
    return NULL;
}

static PyObject *unchanged(PyObject *module, PyObject *args) {
    Py_buffer paths, records;
    int threads;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*y*i:unchanged", &paths, &records, &threads))
        return NULL;
    PyObject *result = NULL;
    const char *path_bytes = paths.buf;
    const char *record_bytes = records.buf;
    Py_ssize_t count = records.len / (Py_ssize_t)sizeof(Record);
    if (records.len % (Py_ssize_t)sizeof(Record) != 0) {
        PyErr_SetString(PyExc_ValueError, "records is not a whole number of records");
        goto done;
    }
    if (paths.len == 0 || path_bytes[paths.len - 1] != '\0') {
        PyErr_SetString(PyExc_ValueError, "paths does not end with a NUL");
        goto done;
    }
    /* Every offset inside `paths`, whose last byte is a NUL: each path read is terminated. */
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t offset;
        memcpy(&offset, record_bytes + i * (Py_ssize_t)sizeof(Record), sizeof offset);
        if (offset < 0 || offset >= paths.len) {
            PyErr_SetString(PyExc_ValueError, "a record's offset is outside paths");
            goto done;
        }
    }
    if (threads < 1)
        threads = 1;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads > (count + BATCH - 1) / BATCH)
        threads = count > BATCH ? (int)((count + BATCH - 1) / BATCH) : 1;

    Work work = {path_bytes, record_bytes, count, 0, 0};
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    Py_BEGIN_ALLOW_THREADS
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&ids[t], NULL, check_paths, &work) == 0;
    /* This thread works too, and alone finishes everything a helper never got to. */
    check_paths(&work);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
    }
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(!work.changed);
done:
    PyBuffer_Release(&paths);
    PyBuffer_Release(&records);
    return result;
}

static PyMethodDef methods[] = {
    {"unchanged", unchanged, METH_VARARGS,
     "unchanged(paths, records, threads) -> bool: whether every remembered path's lstat\n"
     "still has its stamp (see workers/_stamps.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "workers._stamps",
    "The tree index's stamp check, in C without the GIL.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__stamps(void) {
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (PyModule_AddIntConstant(module, "RECORD_SIZE", (long)sizeof(Record)) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
