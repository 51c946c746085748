"""Serving: the HTTP recommendation service and its durable feedback log."""

from recforge.serve.feedback import FeedbackLog

__all__ = ["FeedbackLog", "create_app"]


def __getattr__(name: str) -> object:  # FastAPI is imported only when the service is used
    if name == "create_app":
        from recforge.serve.app import create_app

        return create_app
    raise AttributeError(name)
