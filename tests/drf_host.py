"""A host project's REST_FRAMEWORK that changes every DRF policy a view can see."""

from __future__ import annotations

from typing import Any


def host_exception_handler(exc: Exception, context: dict[str, Any]) -> Any:
    from rest_framework.response import Response

    return Response({"detail": "host handler"}, status=418)


def host_view_name(view: Any) -> str:
    raise AssertionError("the host's VIEW_NAME_FUNCTION was called")


HOST_REST_FRAMEWORK: dict[str, Any] = {
    "DEFAULT_VERSIONING_CLASS": "rest_framework.versioning.URLPathVersioning",
    "ALLOWED_VERSIONS": ["v1", "v2"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.BrowsableAPIRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.FormParser"],
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.BasicAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
    "DEFAULT_THROTTLE_CLASSES": [
        "rest_framework.throttling.AnonRateThrottle",
        "rest_framework.throttling.UserRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {"anon": "1/day", "user": "1/day"},
    "DEFAULT_METADATA_CLASS": "rest_framework.metadata.SimpleMetadata",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 1,
    "DEFAULT_SCHEMA_CLASS": "rest_framework.schemas.coreapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
    "EXCEPTION_HANDLER": "tests.drf_host.host_exception_handler",
    "VIEW_NAME_FUNCTION": "tests.drf_host.host_view_name",
    "VIEW_DESCRIPTION_FUNCTION": "tests.drf_host.host_view_name",
    "COMPACT_JSON": False,
    "UNICODE_JSON": False,
    "URL_FORMAT_OVERRIDE": "format",
    "FORMAT_SUFFIX_KWARG": "version",
}
