"""Errors of the vhost-user layer."""

from __future__ import annotations


class VhostUserError(Exception):
    """Something about the vhost-user conversation is wrong."""


class FramingError(VhostUserError):
    """The byte stream cannot be trusted any more (bad header, oversize body, torn message);
    the only safe outcome is to close the connection."""


class MessageError(VhostUserError):
    """One well-framed request is invalid (size, fds, values, state); it is rejected and the
    conversation goes on."""


class UnknownRequestError(MessageError):
    """A request code outside our request table."""

    def __init__(self, code: int) -> None:
        super().__init__(f"unknown or unsupported request {code}")
        self.code = code


class ResumeError(VhostUserError):
    """A predecessor's state that this back end cannot go on from."""
