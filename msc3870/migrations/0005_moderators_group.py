"""A "Moderators" group that may look at media and the audit trail and moderate media, and
nothing else (no change or delete). Staff put in it can use every moderation action.

Django creates permissions after all migrations have run (post_migrate), so on a new
database they do not exist yet here: they are created now, as Django would name them,
and Django's own pass later finds them in place.
"""

from collections.abc import Iterator

from django.apps.registry import Apps
from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor

GROUP = "Moderators"
# (model, codename, name): the names Django gives them, so they read the same in the admin.
PERMISSIONS = [
    ("media", "view_media", "Can view media"),
    ("media", "moderate_media", "Can moderate media (quarantine, approve, reject, purge)"),
    ("moderationrecord", "view_moderationrecord", "Can view moderation record"),
]


def _permissions(apps: Apps) -> Iterator[object]:
    ContentType = apps.get_model("contenttypes", "ContentType")
    Permission = apps.get_model("auth", "Permission")
    for model, codename, name in PERMISSIONS:
        content_type, _ = ContentType.objects.get_or_create(app_label="msc3870", model=model)
        permission, _ = Permission.objects.get_or_create(
            content_type=content_type, codename=codename, defaults={"name": name}
        )
        yield permission


def create_group(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    Group = apps.get_model("auth", "Group")
    group, _ = Group.objects.get_or_create(name=GROUP)
    group.permissions.add(*_permissions(apps))


def remove_permissions(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    # The group may hold more than this migration gave it (an operator's choice): only
    # take back what was given.
    Group = apps.get_model("auth", "Group")
    group = Group.objects.filter(name=GROUP).first()
    if group is not None:
        group.permissions.remove(*_permissions(apps))


class Migration(migrations.Migration):
    dependencies = [
        ("msc3870", "0004_moderation_record"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_group, remove_permissions)]
