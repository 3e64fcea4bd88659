"""The one error every step of ``aicfl demo`` raises (server.demo and the modules it uses)."""


class DemoError(Exception):
    """The demo could not run; the message says which step failed."""
