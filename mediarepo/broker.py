"""kombu's Redis transport, with a channel that finishes closing when Redis is gone.

A celery worker that loses Redis closes its connection twice: ``collect()``, then
``close()``. kombu's Redis channel starts its close by reading the reply of a BRPOP in
flight; with Redis gone that read raises a connection error, which the first close
passes on (and the worker ignores), leaving the channel open. By the second close the
connection has let go of its broker's address, and a channel holding unacknowledged
messages (a task acknowledged late, still running) tries to put them back through a new
connection pool made from that address: ``AttributeError: 'NoneType' object has no
attribute 'hostname'``, which the worker does not recover from: it exits.

Here the first close goes on past the failed read while the address is still known, so
the channel ends up closed and the second close has nothing left to do. The messages it
could not put back stay in Redis's set of unacknowledged ones, restored after the
visibility timeout (or, if Redis restarted empty, queued again by the sweeps, as all
the work Redis held). ``CELERY_BROKER_TRANSPORT`` names this class for ``redis://``
brokers (mediarepo/settings.py).
"""

from __future__ import annotations

from kombu.transport import redis


class Channel(redis.Channel):
    def close(self) -> None:
        try:
            super().close()
        except self.connection_errors:
            # kombu forgets the failed BRPOP read before raising, so this pass closes
            # the rest; it raises again while Redis is unreachable, ignored as before.
            super().close()


class Transport(redis.Transport):
    Channel = Channel
