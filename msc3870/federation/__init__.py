"""Federation: this server's signing key, X-Matrix signatures, other servers' keys and
media, and SSRF-safe outbound HTTP (the endpoints other servers call are in
``msc3870.api.federation``).

- ``keys``: our Ed25519 signing key and the ``/_matrix/key/v2/server`` answer.
- ``discovery``: where another server is reached (well-known, SRV, 8448).
- ``remote_media``: other servers' media, fetched when a client asks for it.
- ``outbound``: every request to another server goes through it (address guard at connect
  time, size limits, TLS verification).
- ``keyring``: other servers' verify keys, fetched through ``outbound``, checked, cached.
- ``xmatrix``: parsing and verifying ``Authorization: X-Matrix``, and signing our requests.
"""
