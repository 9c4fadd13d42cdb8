"""The segment stream shared by push and pull: frames, negotiation, sender and receiver."""

from zenith.transfer.plan import Plan, Status, make_plan
from zenith.transfer.session import Channel, Progress, TransferResult, receive_branch, send_branch

__all__ = [
    "Channel",
    "Plan",
    "Progress",
    "Status",
    "TransferResult",
    "make_plan",
    "receive_branch",
    "send_branch",
]
