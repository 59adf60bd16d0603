"""``include("msc3870.urls")`` in a host project's URLconf."""

from .api.urls import app_name, urlpatterns

__all__ = ["app_name", "urlpatterns"]
