"""ISO 4217 currency codes and their minor units, embedded as data.

Why embedded: the contract must judge "12.345 EUR" the same way on every machine and in every test, with no
network look-up and no extra dependency. The table is ISO 4217 List One as published on 2026-01-01 (SIX
Financial Information, the maintenance agency), restricted to the codes that have minor units: precious
metals, bond-market units, SDR, Sucre, ADB unit, XTS and XXX have "N.A." and are not currencies an order can
be priced in. Withdrawn codes (HRK, SLL, ANG, CUC, BGN since the euro changeover) are rejected on purpose: a
shop still sending them has a bug worth surfacing. Update this table when ISO publishes an amendment.

Grouped by minor units, because the exceptions to "2" are what a reader needs to see.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from decimal import Decimal
from types import MappingProxyType
from typing import Final

_CODES_BY_MINOR_UNITS: Final = {
    0: "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF",
    2: """
        AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BMD BND BOB BOV BRL BSD BTN BWP BYN BZD CAD CDF CHE
        CHF CHW CNY COP COU CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GTQ GYD
        HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK
        MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD
        RUB SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS UAH
        USD USN UYU UZS VED VES WST XAD XCD XCG YER ZAR ZMW ZWG
    """,
    3: "BHD IQD JOD KWD LYD OMR TND",
    4: "CLF UYW",
}

MINOR_UNITS: Final[Mapping[str, int]] = MappingProxyType(
    {code: units for units, codes in _CODES_BY_MINOR_UNITS.items() for code in codes.split()}
)
"""Active ISO 4217 code → number of decimal places of its minor unit (EUR → 2, JPY → 0, KWD → 3)."""

CURRENCY_CODES: Final[tuple[str, ...]] = tuple(sorted(MINOR_UNITS))
"""Every accepted code, sorted; the JSON Schema lists these as the enum of ``currency``."""


def is_currency(code: str) -> bool:
    """True if `code` is an active ISO 4217 code (upper case, as the standard writes it)."""
    return code in MINOR_UNITS


def minor_units(code: str) -> int:
    """Decimal places of `code`'s minor unit; raises `KeyError` for a code that is not active ISO 4217."""
    try:
        return MINOR_UNITS[code]
    except KeyError:
        raise KeyError(f"{code!r} is not an active ISO 4217 currency code") from None


@functools.cache
def zero(code: str) -> Decimal:
    """Zero at `code`'s places ("0.00" in euros, "0" in yen), made once per currency; the quantum of `at_places`."""
    return Decimal(0).scaleb(-minor_units(code))


def at_places(amount: Decimal, quantum: Decimal) -> Decimal:
    """`amount` written at the places of `quantum` (`zero(currency)`): a shop may write "10" for 10.00 euros, which
    the contract accepts (never more places than the currency has), and a system may expect "10.00"."""
    return amount if amount.same_quantum(quantum) else amount.quantize(quantum)
