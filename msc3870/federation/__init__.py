"""Federation: this server's signing key, X-Matrix authentication, other servers' keys and
SSRF-safe outbound HTTP.

- ``keys``: our Ed25519 signing key and the ``/_matrix/key/v2/server`` answer.
- ``server_names``: the server name grammar and where a server is reached.
- ``outbound``: every request to another server goes through it (address guard at connect
  time, size limits, TLS verification).
- ``keyring``: other servers' verify keys, fetched through ``outbound``, checked, cached.
- ``xmatrix``: parsing and verifying ``Authorization: X-Matrix``, and signing our requests.
"""
