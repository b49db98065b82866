"""Method adapters: one file per method, each registering itself with ``@register_method``."""
