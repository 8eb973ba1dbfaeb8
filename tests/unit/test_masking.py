"""`consumers.masking.mask_url`: what a URL or a URL template may hold as a credential, never shown."""

from __future__ import annotations

import pytest

from consumers.masking import mask_url


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("https://crm.example.com/api", "https://crm.example.com/api"),
        ("https://svc:S3CRET@crm.example.com/api", "https://***@crm.example.com/api"),
        ("https://svc:pa S3'CRET@crm.example.com/api", "https://***@crm.example.com/api"),
        ("https://svc:pa/S3CRET@crm.example.com/api", "https://***@crm.example.com/api"),
        ("https://svc:pa@S3CRET@crm.example.com/api", "https://***@crm.example.com/api"),
        ("https://login.example/token?client_secret=S3CRET", "https://login.example/token?***"),
        ("https://crm.example.com/api#S3CRET", "https://crm.example.com/api#***"),
        # Review: an "@" in the query is no user info: the host stays as it is.
        ("https://h.example/x?notify=ops@example.com", "https://h.example/x?***"),
        ("{base_url}/orders/{id}?api_key=S3CRET", "{base_url}/orders/{id}?***"),
        ("{base_url}/orders/{id}", "{base_url}/orders/{id}"),
        ("crm.example.com:443", "crm.example.com:443"),
        ("not a url @ all ?", "not a url @ all ?"),
    ],
)
def test_what_may_be_a_credential_is_masked_and_the_rest_shown(value: str, shown: str) -> None:
    assert mask_url(value) == shown
