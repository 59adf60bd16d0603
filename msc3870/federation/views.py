"""``GET /_matrix/key/v2/server``: this server's verify keys, self-signed, for deployments
that route it here (otherwise the homeserver publishes them: see the README)."""

from __future__ import annotations

from typing import Any

from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.permissions import AllowAny
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from ..api.errors import exception_handler
from .keys import key_server_response


class _JSONOnly(BaseContentNegotiation):
    """JSON whatever the Accept header says (no 406 for a browser's Accept)."""

    def select_parser(self, request: Request, parsers: list[Any]) -> Any:
        return parsers[0] if parsers else None

    def select_renderer(
        self, request: Request, renderers: list[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        return renderers[0], renderers[0].media_type


class KeyServerView(APIView):
    """Unauthenticated, as the spec has it. The deprecated ``/{keyId}`` suffix answers
    the same (every key), as Synapse does."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    renderer_classes = [JSONRenderer]
    parser_classes: list[Any] = []
    content_negotiation_class = _JSONOnly
    throttle_classes: list[Any] = []

    def get_exception_handler(self) -> Any:
        return exception_handler

    def get(self, request: Request, key_id: str | None = None) -> Response:
        return Response(key_server_response())
