"""``shoal proxy``: run the data-plane proxy in the foreground.

The proxy parses its own flags (shoal.proxy.config, the same for ``python -m shoal.proxy``
and for the container image), so this command passes everything through untouched;
``shoal proxy --help`` prints the proxy's full flag list.
"""

from __future__ import annotations

import typer

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True,
                "help_option_names": []}


def proxy(ctx: typer.Context) -> None:
    """Run the proxy: outbound 4140, inbound 4143, admin 4191 (see --help)."""
    from shoal.proxy.app import main

    main(list(ctx.args))
