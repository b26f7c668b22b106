from __future__ import annotations

import pytest
from pydantic import SecretStr

from bridge.verify import Refused, check_app_id, check_signature, query_keys, sign

TOKEN = SecretStr("xxxxyyyy")
EXAMPLE_TIME = "1669872112"
EXAMPLE_SIGN = "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061"


def test_tencents_worked_example() -> None:
    assert sign("xxxxyyyy", EXAMPLE_TIME) == EXAMPLE_SIGN


def test_query_keys_are_case_insensitive_first_wins() -> None:
    keys = query_keys([("SdkAppId", "1"), ("WEBHOOKCOMMAND", "c"), ("sdkappid", "2")])
    assert keys == {"sdkappid": "1", "webhookcommand": "c"}


@pytest.mark.parametrize("raw", ["1400000000", " 1400000000"])
def test_app_id_accepted(raw: str) -> None:
    assert check_app_id({"sdkappid": raw}, {1400000000}) == 1400000000


@pytest.mark.parametrize(
    "raw", [None, "", "1", "abc", "-1400000000", "1400000000x", "١٤", "1" * 5000]
)
def test_app_id_refused_403(raw: str | None) -> None:
    query = {} if raw is None else {"sdkappid": raw}
    with pytest.raises(Refused) as caught:
        check_app_id(query, {1400000000})
    assert caught.value.status == 403


def test_app_id_of_20_digits_is_still_compared_with_the_config() -> None:
    # The length guard only spares int() an absurd string: an SDKAppID as long as a uint64 passes.
    assert check_app_id({"sdkappid": str(2**64 - 1)}, {2**64 - 1}) == 2**64 - 1


@pytest.mark.parametrize("offset", [-60, -59, 0, 59, 60])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.999])
def test_signature_accepted_up_to_max_age_either_way(offset: int, fraction: float) -> None:
    # RequestTime is in whole seconds, and so is the age it is allowed: a callback signed 60 s
    # before a now of x.3 was refused as 60.3 s old, one 60 s after it taken.
    query = {"sign": EXAMPLE_SIGN, "requesttime": EXAMPLE_TIME}
    check_signature(query, TOKEN, 60, now=int(EXAMPLE_TIME) - offset + fraction)


@pytest.mark.parametrize("offset", [-61, 61])
@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_signature_refused_past_max_age_either_way(offset: int, fraction: float) -> None:
    query = {"sign": EXAMPLE_SIGN, "requesttime": EXAMPLE_TIME}
    with pytest.raises(Refused, match="too far"):
        check_signature(query, TOKEN, 60, now=int(EXAMPLE_TIME) - offset + fraction)


def test_signature_accepted_in_upper_case() -> None:
    query = {"sign": EXAMPLE_SIGN, "requesttime": EXAMPLE_TIME}
    check_signature({**query, "sign": EXAMPLE_SIGN.upper()}, TOKEN, 60, now=int(EXAMPLE_TIME))


def test_no_token_no_check() -> None:
    check_signature({}, None, 60, now=0)


@pytest.mark.parametrize(
    ("query", "now_offset", "reason"),
    [
        ({}, 0, "required"),
        ({"sign": EXAMPLE_SIGN}, 0, "required"),
        ({"requesttime": EXAMPLE_TIME}, 0, "required"),
        ({"sign": EXAMPLE_SIGN, "requesttime": EXAMPLE_TIME}, 61, "too far"),
        ({"sign": EXAMPLE_SIGN, "requesttime": EXAMPLE_TIME}, -61, "too far"),
        ({"sign": "0" * 64, "requesttime": EXAMPLE_TIME}, 0, "bad Sign"),
        ({"sign": EXAMPLE_SIGN, "requesttime": "1669872113"}, 0, "bad Sign"),
        ({"sign": EXAMPLE_SIGN, "requesttime": "16698721.2"}, 0, "bad RequestTime"),
        ({"sign": "ü", "requesttime": EXAMPLE_TIME}, 0, "bad Sign"),
        ({"sign": EXAMPLE_SIGN, "requesttime": "1" * 5000}, 0, "bad RequestTime"),
    ],
)
def test_signature_refused_401(query: dict[str, str], now_offset: int, reason: str) -> None:
    with pytest.raises(Refused) as caught:
        check_signature(query, TOKEN, 60, now=int(EXAMPLE_TIME) + now_offset)
    assert caught.value.status == 401
    assert reason in caught.value.info
    assert "xxxxyyyy" not in caught.value.info
