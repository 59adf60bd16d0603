"""The app's admin: the moderation console (media: list, pages, actions, dashboard), the
audit trail, the block list, local access tokens and cached URL previews."""

from .actions import MODERATE_PERMISSION, OPERATIONS
from .blocklist import BlockedHashAdmin
from .media import MediaAdmin
from .previews import URLPreviewAdmin
from .records import ModerationRecordAdmin, ModerationRecordInline
from .tokens import AccessTokenAdmin

__all__ = [
    "MODERATE_PERMISSION",
    "OPERATIONS",
    "AccessTokenAdmin",
    "BlockedHashAdmin",
    "MediaAdmin",
    "ModerationRecordAdmin",
    "ModerationRecordInline",
    "URLPreviewAdmin",
]
