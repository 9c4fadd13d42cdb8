"""Push and pull's stream, shared by both directions: the typed messages (``messages``),
frames (``frames``), negotiation (``plan``), the sending and receiving ends (``sender``,
``receiver``) and the channel they run over (``channel``)."""

from zenith.transfer.channel import Channel, TransferLocks
from zenith.transfer.messages import Progress, Status, TransferArgs, TransferResult
from zenith.transfer.plan import Plan, make_plan
from zenith.transfer.receiver import receive_branch
from zenith.transfer.sender import send_branch

__all__ = [
    "Channel",
    "Plan",
    "Progress",
    "Status",
    "TransferArgs",
    "TransferLocks",
    "TransferResult",
    "make_plan",
    "receive_branch",
    "send_branch",
]
