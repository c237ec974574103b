"""The control-flow example of the issue and of docs/control-flow.md: a checkout with a
fan-out over its items, a conditional sub-flow that mails a receipt, and the other branch.
The tests of conditions, routing, tools and the runtime all start from it."""

from __future__ import annotations

CHECKOUT_FLOW = (
    "Request\tLog\tMachine\tWhen\tEach\n"
    "checkout\tCart submitted by :user\tweb\n"
    "checkout\tReserving :sku\tinventory\t\titems\n"
    "checkout\tCharging card #card for :total\tpayments\n"
    "checkout\t@receipt\tweb\tcharged\n"
    "checkout\tPayment declined for :user\tweb\tnot charged\n"
    "receipt\tRendering receipt for :user\tweb\n"
    "receipt\tSending receipt to :email\tmailer\n"
)
