"""Wire types of the account tasks: `accountManagement` (what a key may do and has spent) and
`getTaskDetails` (a past task's request, response, cost and timings).

runware-sdk 1.8's task_map lists four accountManagement operations; Runware's platform page
says only `getDetails` is available, and that is the one impasto answers. The request's date
window fields (startDate, endDate, ...) belong to the usage operations and are refused here
with the operation itself.
"""

from __future__ import annotations

from typing import Literal

from impasto.protocol.fields import UUID4
from impasto.protocol.tasks import WireModel


class AccountManagementIn(WireModel):
    taskType: Literal["accountManagement"]
    taskUUID: UUID4
    operation: Literal["getDetails"]


class GetTaskDetailsIn(WireModel):
    taskType: Literal["getTaskDetails"]
    # The past task's UUID (Runware's form: the task names the task it asks about).
    taskUUID: UUID4
