"""azure-batch 15.1.0 calling operations bluebatch does not serve: each fails at once (no retry)
with HTTP 501 and the Batch error NotImplemented naming the operation (docs/contract.md §1),
instead of an InvalidUri that would suggest the call itself is wrong.
"""
from __future__ import annotations

import time

import pytest
from azure.core.exceptions import HttpResponseError
from azure.batch import models

from sdkutil import assert_batch_error, error_values


def _calls(client):
    job = models.BatchJobCreateOptions(id="j1", pool_info=models.BatchPoolInfo(pool_id="p1"))
    return [
        ("Job_Add", lambda: client.create_job(job)),
        ("Job_List", lambda: list(client.list_jobs())),
        ("Task_List", lambda: list(client.list_tasks("j1"))),
        ("Account_ListSupportedImages", lambda: list(client.list_supported_images())),
        ("Account_ListPoolNodeCounts", lambda: list(client.list_pool_node_counts())),
        ("File_ListFromComputeNode", lambda: list(client.list_node_files("p1", "n1"))),
        ("JobSchedule_List", lambda: list(client.list_job_schedules())),
    ]


@pytest.mark.parametrize("index", range(7))
def test_unserved_operations_answer_501_naming_the_operation(client, index):
    operation, call = _calls(client)[index]
    started = time.monotonic()
    with pytest.raises(HttpResponseError) as exc_info:
        call()
    assert_batch_error(exc_info, 501, "NotImplemented")
    assert error_values(exc_info.value).get("Operation") == operation
    assert operation in exc_info.value.error.message
    # 501 is not retried by azure-core: the answer comes at once.
    assert time.monotonic() - started < 5
