"""Test settings of a host project whose REST_FRAMEWORK changes every DRF policy it can.

Used by tests/test_host_rest_framework.py in a child pytest: DRF binds most policies when it is
imported, so only a process that starts with them shows what a host really gets.
"""

from tests.drf_host import HOST_REST_FRAMEWORK
from tests.settings import *  # noqa: F403

REST_FRAMEWORK = HOST_REST_FRAMEWORK
