"""Routes of the endpoints other servers call (beside the client ones in ``api/urls.py``,
which includes these)."""

from __future__ import annotations

from django.urls import re_path

from . import views

# The media id is matched loosely and validated by the downloads module (400 M_INVALID_PARAM for a
# bad one, not "unrecognized endpoint").
MEDIA_ID = r"(?P<media_id>[^/]+)"

urlpatterns = [
    re_path(
        rf"^_matrix/federation/v1/media/download/{MEDIA_ID}$",
        views.FederationDownloadView.as_route(),
        name="federation-download",
    ),
    re_path(
        rf"^_matrix/federation/v1/media/thumbnail/{MEDIA_ID}$",
        views.FederationThumbnailView.as_route(),
        name="federation-thumbnail",
    ),
]
