"""The endpoints other servers call: X-Matrix authentication and per-origin rates
(``authentication``), their views and routes. Talking to other servers, keys and
signatures themselves are ``msc3870.federation``'s."""
