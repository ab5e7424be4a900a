from django.urls import include, path

urlpatterns = [path("", include("shopapp.site_urls"))]
