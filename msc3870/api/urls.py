"""Routes of the media endpoints; include at the site root: ``path("", include(...))``."""

from __future__ import annotations

from django.db import transaction
from django.urls import re_path

from . import admin, operating, views
from .federation import urls as federation_urls
from .federation.views import KeyServerView

app_name = "msc3870"

# Path components are matched loosely and validated by the uploads and downloads modules,
# so a bad id gets M_INVALID_PARAM rather than "unrecognized endpoint".
MXC = r"(?P<server_name>[^/]+)/(?P<media_id>[^/]+)"
FILE_NAME = r"(?:/(?P<file_name>[^/]+))?"
# Synapse's admin API (the media part: rooms stay with the homeserver).
ADMIN = r"^_synapse/admin/v1/"


def view(cls: type[views.MatrixView]) -> object:
    """Views commit as they go (each transition is its own compare-and-set, and tasks are
    queued after commit), even in a host project with ATOMIC_REQUESTS."""
    return transaction.non_atomic_requests(cls.as_view())


urlpatterns = [
    re_path(
        r"^_matrix/media/(?:v1|unstable/fi\.mau\.msc2246)/create$",
        view(views.CreateView),
        name="create",
    ),
    re_path(
        rf"^_matrix/media/(?:v3|r0|unstable/fi\.mau\.msc2246)/upload/{MXC}$",
        view(views.UploadToMediaView),
        name="upload-to-media",
    ),
    re_path(
        rf"^_matrix/media/(?:v1|unstable/com\.beeper\.msc3870)/upload/{MXC}/complete$",
        view(views.CompleteView),
        name="complete",
    ),
    re_path(r"^_matrix/media/(?:v3|r0)/upload$", view(views.UploadView), name="upload"),
    re_path(
        r"^_matrix/media/unstable/com\.beeper\.msc3870/upload_url/(?P<token>[^/]+)$",
        view(views.UploadURLView),
        name="upload-url",
    ),
    re_path(
        rf"^_matrix/client/v1/media/download/{MXC}{FILE_NAME}$",
        view(views.DownloadView),
        name="download",
    ),
    re_path(
        # v1 too, as Synapse serves it (synapse-admin links media there).
        rf"^_matrix/media/(?:v3|r0|v1)/download/{MXC}{FILE_NAME}$",
        view(views.LegacyDownloadView),
        name="legacy-download",
    ),
    re_path(
        rf"^_matrix/client/v1/media/thumbnail/{MXC}$",
        view(views.ThumbnailView),
        name="thumbnail",
    ),
    re_path(
        rf"^_matrix/media/(?:v3|r0|v1)/thumbnail/{MXC}$",
        view(views.LegacyThumbnailView),
        name="legacy-thumbnail",
    ),
    re_path(
        r"^_matrix/client/v1/media/preview_url$", view(views.PreviewURLView), name="preview-url"
    ),
    re_path(
        r"^_matrix/media/(?:v3|r0)/preview_url$",
        view(views.PreviewURLView),
        name="legacy-preview-url",
    ),
    re_path(
        rf"^_matrix/client/(?:v1|unstable/uk\.timedout\.msc4322)/media/redact/{MXC}$",
        view(views.RedactView),
        name="redact",
    ),
    re_path(r"^_matrix/client/v1/media/config$", view(views.ConfigView), name="config"),
    re_path(r"^_matrix/media/(?:v3|r0)/config$", view(views.ConfigView), name="legacy-config"),
    re_path(r"^_matrix/client/versions$", view(views.VersionsView), name="versions"),
    # Our signing keys; the deprecated /{keyId} form answers the same.
    re_path(
        r"^_matrix/key/v2/server(?:/(?P<key_id>[^/]+))?$",
        KeyServerView.as_view(),
        name="key-server",
    ),
    # /_matrix/federation/v1/media/...: media of this server for other servers.
    *federation_urls.urlpatterns,
    # Synapse's media admin API.
    re_path(
        ADMIN + r"users/(?P<user_id>[^/]+)/media$",
        view(admin.UserMediaView),
        name="admin-user-media",
    ),
    re_path(
        ADMIN + r"user/(?P<user_id>[^/]+)/media/quarantine$",
        view(admin.QuarantineUserMediaView),
        name="admin-quarantine-user-media",
    ),
    re_path(
        ADMIN + rf"media/quarantine/{MXC}$",
        view(admin.QuarantineMediaView),
        name="admin-quarantine-media",
    ),
    re_path(
        ADMIN + rf"media/unquarantine/{MXC}$",
        view(admin.UnquarantineMediaView),
        name="admin-unquarantine-media",
    ),
    re_path(ADMIN + r"media/delete$", view(admin.DeleteMediaBeforeView), name="admin-delete-media"),
    # media/{server}/{id} (GET, DELETE), media/protect/{id}, media/unprotect/{id} and
    # media/{server}/delete (POST): one path, told apart by method as Synapse does.
    re_path(
        ADMIN + r"media/(?P<first>[^/]+)/(?P<second>[^/]+)$",
        view(admin.MediaView),
        name="admin-media",
    ),
    re_path(
        ADMIN + r"purge_media_cache$", view(admin.PurgeMediaCacheView), name="admin-purge-cache"
    ),
    re_path(
        ADMIN + r"statistics/users/media$",
        view(admin.UserMediaStatisticsView),
        name="admin-media-statistics",
    ),
    # For operators: the health check (/healthz is matrix-media-repo's spelling) and the
    # metrics (served on the metrics listener only).
    re_path(r"^healthz?$", view(operating.HealthView), name="health"),
    re_path(r"^metrics$", view(operating.MetricsView), name="metrics"),
]
