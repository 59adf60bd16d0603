"""Routes of the media endpoints; include at the site root: ``path("", include(...))``."""

from __future__ import annotations

from django.urls import re_path

from . import views

app_name = "msc3870"

# Path components are matched loosely and validated by the services, so a bad id gets
# M_INVALID_PARAM rather than "unrecognized endpoint".
MXC = r"(?P<server_name>[^/]+)/(?P<media_id>[^/]+)"
FILE_NAME = r"(?:/(?P<file_name>[^/]+))?"

urlpatterns = [
    re_path(
        r"^_matrix/media/(?:v1|unstable/fi\.mau\.msc2246)/create$",
        views.CreateView.as_view(),
        name="create",
    ),
    re_path(
        rf"^_matrix/media/(?:v3|r0|unstable/fi\.mau\.msc2246)/upload/{MXC}$",
        views.UploadToMediaView.as_view(),
        name="upload-to-media",
    ),
    re_path(
        rf"^_matrix/media/(?:v1|unstable/com\.beeper\.msc3870)/upload/{MXC}/complete$",
        views.CompleteView.as_view(),
        name="complete",
    ),
    re_path(r"^_matrix/media/(?:v3|r0)/upload$", views.UploadView.as_view(), name="upload"),
    re_path(
        r"^_matrix/media/unstable/com\.beeper\.msc3870/upload_url/(?P<token>[^/]+)$",
        views.UploadURLView.as_view(),
        name="upload-url",
    ),
    re_path(
        rf"^_matrix/client/v1/media/download/{MXC}{FILE_NAME}$",
        views.DownloadView.as_view(),
        name="download",
    ),
    re_path(
        rf"^_matrix/media/(?:v3|r0)/download/{MXC}{FILE_NAME}$",
        views.LegacyDownloadView.as_view(),
        name="legacy-download",
    ),
    re_path(r"^_matrix/client/v1/media/config$", views.ConfigView.as_view(), name="config"),
    re_path(r"^_matrix/media/(?:v3|r0)/config$", views.ConfigView.as_view(), name="legacy-config"),
    re_path(r"^_matrix/client/versions$", views.VersionsView.as_view(), name="versions"),
]
