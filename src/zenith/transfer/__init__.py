"""Push and pull's stream, shared by both directions: the typed messages (``messages``),
frames (``frames``), negotiation (``plan``), the sending and receiving ends (``sender``,
``receiver``) and the channel they run over (``channel``).

Import from the submodules. This package imports none of them, so the CLI can use
``messages`` (results, progress, command arguments) without loading the rest.
"""
