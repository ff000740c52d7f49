SECRET_KEY = "only-for-the-buildq-tests"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "mysite.urls"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
