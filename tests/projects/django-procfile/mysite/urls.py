import django
from django.http import HttpResponse
from django.urls import path


def index(request):
    return HttpResponse(f"django {django.get_version()} site\n", content_type="text/plain")


urlpatterns = [path("", index)]
