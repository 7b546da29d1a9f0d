"""``python -m maskx_cli`` runs the ``maskx`` command."""

from maskx_cli.main import app

app()
