"""azure-batch 15.1.0 (requests/urllib3, which write the whole body before reading) sending a body
over the 1 MiB limit reads the 413 RequestBodyTooLarge, not a broken pipe or a reset
(docs/contract.md §3, "An early answer is readable"). On loopback the kernel's socket buffers
often absorb 2 MiB and hide the old failure; crates/bluebatch/tests/early_answers.rs paces its
writer as a real network does and shows it.
"""
from __future__ import annotations

import pytest
from azure.core.exceptions import HttpResponseError
from azure.batch import models

from sdkutil import assert_batch_error


def test_a_2_mib_body_gets_its_413(client):
    huge = models.BatchNodeUserReplaceOptions(password="x" * (2 << 20))
    with pytest.raises(HttpResponseError) as exc_info:
        client.replace_node_user("p1", "n1", "alice", huge)
    assert_batch_error(exc_info, 413, "RequestBodyTooLarge")
