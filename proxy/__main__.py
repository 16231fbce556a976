"""``python -m shoal.proxy``: the proxy process (see app.py and docs/proxy.md)."""

from .app import main

if __name__ == "__main__":
    main()
