"""Company data: what LeadStream knows about the company behind an account, keyed by its domain.

One record per account domain, loaded from a file (`leadstream companies load`) or filled in by an
enrichment provider (processors/company_resolver.py); kept in Redis for the processors and the API and
in the ClickHouse `companies` table for analysts. Validation of loaded rows is in processors/companies.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from schemas.records import JsonRecord

COMPANY_FIELDS = ("domain", "name", "industry", "employees", "country", "website", "linkedin_url", "logo_url",
                  "source")
"""The fields a company file or a provider gives (the loader derives `employees_min` and `updated_ms`)."""


@dataclass(slots=True, frozen=True)
class Company(JsonRecord):
    """A company card. `employees` is the range as text ("51-200", "10001+", "12"); `employees_min` is its
    lower bound, the number rules compare (`account.employees gt 50`), 0 when unknown. `country` is
    ISO 3166-1 alpha-2. `source` says where the card came from ("file", "provider:<host>", ...);
    `updated_ms` when it last changed (the ClickHouse table keeps the newest)."""

    domain: str
    name: str
    industry: str = ""
    employees: str = ""
    employees_min: int = 0
    country: str = ""
    website: str = ""
    linkedin_url: str = ""
    logo_url: str = ""
    source: str = ""
    updated_ms: int = 0

    def same_card(self, other: Company) -> bool:
        """Equal but for when it was written: loading the same data again changes nothing."""
        return all(getattr(self, name) == getattr(other, name) for name in COMPANY_FIELDS)


class CompanyCards(Protocol):
    """The company cards by account domain, as rules and segments read them (`account.industry`, ...):
    processors.companies.CompanyDirectory in a worker; a dict will do."""

    def get(self, domain: str, /) -> Company | None: ...


NO_COMPANIES: CompanyCards = MappingProxyType({})
