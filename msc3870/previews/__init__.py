"""URL previews (``/_matrix/client/v1/media/preview_url``): Open Graph fields of a page,
fetched once per URL and time bucket however many ask, through the outbound guard.

``service`` is the request side (cache, claim, wait), ``fetch`` the fetch itself (a task),
``html`` and ``oembed`` read what was fetched, ``guard`` says which URLs and addresses may
be fetched, ``answers`` what a request hears.
"""
