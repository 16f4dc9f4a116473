"""Deterministic, realistic synthetic tracking traffic (input contract v1) for the demo and the benchmark.

Why a small simulation rather than random rows: the pipeline's hard parts are only exercised by traffic
that has their shape. People come back over several days and sometimes on a second device; companies
have several employees (anonymous behind an office IP, known after a form or an email click); free-mail
people fill in forms; campaign emails are opened in a mail client and clicked through with ?lb_email=;
crawlers and datacenter scrapers never identify; and a trickle of broken messages must reach the DLQ,
each with the reason it was built to have.

Same arguments, same bytes: all randomness comes from seeded `random.Random` instances and nothing reads
the clock. Messages come out as one global stream ordered by arrival (event time plus, now and then, a
few seconds of delivery delay), so each visitor's events are in event-time order except for small swaps.
Every IP address is in a documentation range (RFC 5737, RFC 3849): never a real public address.
"""

from __future__ import annotations

import base64
import heapq
import ipaddress
import itertools
import time
import unicodedata
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from operator import itemgetter
from random import Random
from typing import NamedTuple, TypeVar
from urllib.parse import quote

import orjson

from schemas.events import EVENT_TYPES

_T = TypeVar("_T")
MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
DEFAULT_START_MS = 1_793_520_000_000  # 2026-11-01T08:00:00Z (a Sunday)
_SPAWN_HOURS = 5 * 24  # people first show up during the first five days...
_HISTORY_MS = 5 * DAY  # ...and keep coming back for at most five days after that
_UNKNOWN_NOW_MS = 4_102_444_800_000  # 2100-01-01: stands in for the receiver's clock when it is not given

MALFORMED_REASONS: tuple[str, ...] = (
    "bad_json", "missing_field", "wrong_type", "unknown_event_type", "ts_in_future", "oversized", "invalid_value",
)  # fmt: skip
_DUPLICATE = "duplicate"
_TAGS = (*EVENT_TYPES, *MALFORMED_REASONS, _DUPLICATE)  # what each yielded message is counted as
_OVERSIZED_TEXT = "0123456789abcdef" * 6400  # 100 KiB: over the default 64 KiB payload limit

# --------------------------------------------------------------------------------------------------
# Reference data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Company:
    """A fictitious company whose employees visit the site. `domain` is registrable: the account key. The
    rest is its company card (`company_card_rows`) and where its office is (the IP-range table)."""

    name: str
    domain: str
    email_subdomains: tuple[str, ...]  # some staff mail from e.g. eu.globex.io; the account is still globex.io
    office_v4: str  # CIDR in a documentation range: feeds the IP-range table
    office_v6: str
    industry: str
    employees: str
    country: str  # ISO 3166-1 alpha-2, of its office
    region: str
    city: str


_COMPANY_ROWS: tuple[tuple[str, str, tuple[str, ...], str, str, str, str, str], ...] = (
    ('Acme Robotics', 'acme-robotics.com', (), 'Industrial Automation', '201-500', 'US', 'California', 'San Jose'),
    ('Globex', 'globex.io', ('eu.', 'us.'), 'Software', '1001-5000', 'US', 'New York', 'New York'),
    ('Initech', 'initech.co.uk', (), 'IT Services', '51-200', 'GB', 'England', 'London'),
    ('Umbrella Biotech', 'umbrella-bio.com', (), 'Biotechnology', '5001-10000', 'US', 'Massachusetts', 'Boston'),
    ('Stark Logistics', 'stark-logistics.de', (), 'Logistics', '501-1000', 'DE', 'Hamburg', 'Hamburg'),
    ('Wayne Analytics', 'wayneanalytics.com', (), 'Data & Analytics', '11-50', 'US', 'Illinois', 'Chicago'),
    ('Cyberdyne Systems', 'cyberdyne.ai', (), 'Artificial Intelligence', '201-500', 'US', 'California', 'Sunnyvale'),
    ('Soylent Foods', 'soylentfoods.com.au', (), 'Food Production', '1001-5000', 'AU', 'New South Wales', 'Sydney'),
    ('Tyrell Engineering', 'tyrell-eng.co.jp', (), 'Engineering', '501-1000', 'JP', 'Tokyo', 'Tokyo'),
    ('Wonka Confectionery', 'wonka.co.nz', (), 'Food & Beverages', '201-500', 'NZ', 'Auckland', 'Auckland'),
    ('Vandelay Industries', 'vandelay.com', (), 'Import & Export', '11-50', 'US', 'New York', 'New York'),
    ('Pied Piper', 'piedpiper.net', (), 'Software', '51-200', 'US', 'California', 'Palo Alto'),
    ('Massive Dynamic', 'massivedynamic.com', ('research.',), 'Research', '10001+', 'US', 'New York', 'New York'),
    ('Oscorp Materials', 'oscorp.com.br', (), 'Chemicals', '1001-5000', 'BR', 'São Paulo', 'São Paulo'),
    ('Aperture Science', 'aperturescience.co.uk', (), 'Research', '201-500', 'GB', 'Scotland', 'Edinburgh'),
    ('Black Mesa Research', 'blackmesa-research.com', (), 'Research', '501-1000', 'US', 'New Mexico', 'Albuquerque'),
    ('Hyperion Freight', 'hyperionfreight.com.sg', (), 'Logistics', '201-500', 'SG', '', 'Singapore'),
    ('Nakatomi Trading', 'nakatomi.co.jp', (), 'Wholesale', '1001-5000', 'JP', 'Osaka', 'Osaka'),
    ('Gringotts Finance', 'gringotts-finance.ch', (), 'Financial Services', '501-1000', 'CH', 'Zurich', 'Zurich'),
    ('Dunder Mifflin Paper', 'dundermifflin.com', (), 'Paper & Packaging', '201-500', 'US', 'Pennsylvania', 'Scranton'),
    ('Sterling Cooper', 'sterling-cooper.com', (), 'Advertising', '51-200', 'US', 'New York', 'New York'),
    ('Prestige Worldwide', 'prestigeworldwide.co', (), 'Entertainment', '2-10', 'US', 'California', 'Los Angeles'),
    ('Bluth Property', 'bluthcompany.com', (), 'Real Estate', '51-200', 'US', 'California', 'Newport Beach'),
    ('Monarch Solutions', 'monarch-solutions.fr', (), 'IT Services', '201-500', 'FR', 'Île-de-France', 'Paris'),
    ('Rekall Travel', 'rekall.es', (), 'Travel', '51-200', 'ES', 'Madrid', 'Madrid'),
    ('Virtucon', 'virtucon.com', (), 'Manufacturing', '1001-5000', 'US', 'Texas', 'Houston'),
    ('Octan Energy', 'octan-energy.nl', (), 'Energy', '5001-10000', 'NL', 'South Holland', 'Rotterdam'),
    ('Krusty Foods', 'krustyfoods.ca', (), 'Restaurants', '501-1000', 'CA', 'Ontario', 'Toronto'),
    ('Sirius Cybernetics', 'siriuscybernetics.co.za', (), 'Robotics', '201-500', 'ZA', 'Western Cape', 'Cape Town'),
    ('Ollivander Instruments', 'ollivanders.ie', (), 'Instruments', '11-50', 'IE', 'Leinster', 'Dublin'),
    ('Blue Sun Shipping', 'bluesun.com.cn', (), 'Shipping', '10001+', 'CN', 'Shanghai', 'Shanghai'),
    ('Weyland Aerospace', 'weyland-aero.com', (), 'Aerospace', '5001-10000', 'US', 'Washington', 'Seattle'),
    ('Contoso', 'contoso.com', (), 'Software', '1001-5000', 'US', 'Washington', 'Redmond'),
    ('Fabrikam', 'fabrikam.co.in', ('in.',), 'Textiles', '501-1000', 'IN', 'Karnataka', 'Bengaluru'),
    ('Northwind Traders', 'northwindtraders.com.mx', (), 'Wholesale', '201-500', 'MX', 'Jalisco', 'Guadalajara'),
    ('Tailspin Toys', 'tailspintoys.se', (), 'Consumer Goods', '51-200', 'SE', 'Stockholm', 'Stockholm'),
    ('Adventure Works', 'adventure-works.it', (), 'Sporting Goods', '201-500', 'IT', 'Lombardy', 'Milan'),
    ('Litware', 'litware.pl', (), 'Software', '51-200', 'PL', 'Masovia', 'Warsaw'),
    ('Proseware', 'proseware.co.kr', (), 'Software', '201-500', 'KR', 'Seoul', 'Seoul'),
    ('Wingtip Solutions', 'wingtip.com.tr', (), 'IT Services', '11-50', 'TR', 'Istanbul', 'Istanbul'),
)


def _office_v4(index: int) -> str:
    """40 /29 office blocks: 32 in 198.51.100.0/24, 8 in 203.0.113.0/26."""
    return f"198.51.100.{index * 8}/29" if index < 32 else f"203.0.113.{(index - 32) * 8}/29"


COMPANIES: tuple[Company, ...] = tuple(
    Company(name, domain, subdomains, _office_v4(index), f"2001:db8:{0x100 + index:x}::/48", *card)
    for index, (name, domain, subdomains, *card) in enumerate(_COMPANY_ROWS)
)

# Non-company networks, as (cidr, owner, kind, country) rows of the IP-range table.
_NETWORKS: tuple[tuple[str, str, str, str], ...] = (
    ("192.0.2.0/24", "Example Broadband", "isp", "US"),
    ("203.0.113.64/26", "Example Mobile", "isp", "DE"),
    ("203.0.113.128/26", "Example Cable", "isp", "NL"),
    ("203.0.113.192/26", "Example Cloud", "datacenter", "US"),
    ("2001:db8:4000::/34", "Example Broadband", "isp", "US"),
    ("2001:db8:ffff::/48", "Example Cloud", "datacenter", "US"),
)


def _hosts(*cidrs: str) -> tuple[str, ...]:
    return tuple(str(host) for cidr in cidrs for host in ipaddress.ip_network(cidr).hosts())


_OFFICE_V4_HOSTS = tuple(_hosts(company.office_v4) for company in COMPANIES)
_OFFICE_V6_PREFIXES = tuple(company.office_v6.split("::")[0] for company in COMPANIES)
_HOME_V4_HOSTS = _hosts("192.0.2.0/24", "203.0.113.128/26")
_MOBILE_V4_HOSTS = _hosts("203.0.113.64/26")
_DATACENTER_V4_HOSTS = _hosts("203.0.113.192/26")


def _residential_v6_prefix(rng: Random) -> str:
    """A home or mobile /48 inside the ISP's 2001:db8:4000::/34."""
    return f"2001:db8:{rng.randrange(0x4000, 0x8000):x}"

FIRST_NAMES: tuple[str, ...] = (
    "James", "Mary", "Sophie", "Liam", "Emma", "Noah", "Olivia", "Lucas", "Mia", "Ethan", "Ava", "Daniel",
    "Hannah", "Mateo", "Sara", "Arjun", "Priya", "Wei", "Mei", "Yuki", "Kenji", "Fatima", "Omar", "Aisha",
    "Kwame", "Amara", "Lars", "Ingrid", "Pieter", "Anouk", "Luca", "Giulia", "Tomasz", "Agnieszka", "Olga",
    "Dmitri", "Sean", "Niamh", "Zoë", "José", "Björn", "Chloé", "Renée", "Jürgen", "Inés", "François",
)  # fmt: skip
LAST_NAMES: tuple[str, ...] = (
    "Smith", "Jones", "Williams", "Brown", "Taylor", "Martin", "Schmidt", "Müller", "Fischer", "Dubois",
    "Moreau", "Rossi", "García", "Lopez", "Silva", "Costa", "Kowalski", "Novak", "Ivanova", "Johansson",
    "Andersen", "van der Berg", "O'Brien", "Murphy", "Walsh", "Nguyen", "Chen", "Kim", "Park", "Tanaka",
    "Sato", "Patel", "Singh", "Okafor", "Mensah", "Haddad", "Cohen", "Yilmaz", "Hughes", "Clarke",
)  # fmt: skip
JOB_TITLES: tuple[str, ...] = (
    "VP Marketing", "Head of Growth", "Marketing Manager", "Demand Generation Lead", "Sales Director",
    "Account Executive", "SDR Team Lead", "CTO", "CEO", "COO", "Data Engineer", "Marketing Operations",
    "RevOps Manager", "Product Manager", "Procurement Specialist", "Founder",
)  # fmt: skip
_EMAIL_LOCAL_PATTERNS = ("{first}.{last}", "{f}{last}", "{first}", "{first}_{last}")
FREE_MAIL_DOMAINS: tuple[str, ...] = (
    "gmail.com", "gmail.com", "gmail.com", "gmail.com", "yahoo.com", "yahoo.com", "outlook.com", "outlook.com",
    "hotmail.com", "hotmail.com", "icloud.com", "yahoo.co.uk", "gmx.de", "proton.me",
)  # fmt: skip
DISPOSABLE_DOMAINS: tuple[str, ...] = ("mailinator.com", "yopmail.com", "10minutemail.com", "guerrillamail.com")
_WEBMAIL_REFERRERS = {
    "gmail.com": "https://mail.google.com/",
    "outlook.com": "https://outlook.live.com/",
    "hotmail.com": "https://outlook.live.com/",
    "yahoo.com": "https://mail.yahoo.com/",
}
_JUNK_IDS = ("undefined", "null", "guest", "", "anonymous", "[object Object]")  # broken client code, seen in the wild
_HOSTILE_FORM_VALUES = (  # valid input that must be stored and shown safely
    ("first_name", "<script>alert(1)</script>"),
    ("company", "Robert'); DROP TABLE leads;--"),
    ("job_title", "Growth \u202ehacker"),
    ("message", "Hi,\nplease call me back.\r\nThanks\x07"),
    ("company", "🚀 Rocket Growth GmbH"),
)

DESKTOP_USER_AGENTS: tuple[str, ...] = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 Safari/537.36 Edg/130.0.0.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:132.0) Gecko/20100101 Firefox/132.0",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
)
MOBILE_USER_AGENTS: tuple[str, ...] = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPad; CPU OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
)
MAIL_CLIENT_USER_AGENTS: tuple[str, ...] = (
    "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.18129; Pro)",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Thunderbird/128.4.0",
)
CRAWLER_USER_AGENTS: tuple[str, ...] = (
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; Googlebot/2.1; +http://www.google.com/bot.html) Chrome/130.0.6723.69 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.6723.69 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm) Chrome/116.0.1938.76 Safari/537.36",
    "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
    "Mozilla/5.0 (compatible; SemrushBot/7~bl; +http://www.semrush.com/bot.html)",
)
HEADLESS_USER_AGENT = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/130.0.6723.58 Safari/537.36"
)
_SDK_EXTRAS = ({"lib": "leadstream-js/2.4.1"}, {"lib": "leadstream-js/2.3.0", "screen": "1920x1080"})


class _Page(NamedTuple):
    path: str
    title: str
    custom_events: tuple[tuple[str, dict[str, str | int]], ...]  # (name, properties) this page can fire


_VIDEO = (("video_play", {"video": "product-tour", "position_s": 0}),)
_SCROLL = (("scroll_depth", {"percent": 50}), ("scroll_depth", {"percent": 75}), ("scroll_depth", {"percent": 100}))
_CHAT = ("chat_opened", {"widget": "sales"})

# (page, weight when browsing, weight when evaluating the product). Weight 0: reached only as a landing.
_PAGE_ROWS: tuple[tuple[_Page, float, float], ...] = (
    (_Page("/", "Example – Turn anonymous visitors into qualified leads", _VIDEO), 10, 6),
    (_Page("/pricing", "Pricing – Example", (
        ("pricing_calculator", {"seats": 10, "plan": "starter"}),
        ("pricing_calculator", {"seats": 50, "plan": "growth"}), _CHAT)), 5, 14),
    (_Page("/features/lead-scoring", "Lead scoring – Example", _VIDEO), 4, 8),
    (_Page("/features/visitor-identification", "Visitor identification – Example", _VIDEO), 4, 8),
    (_Page("/features/email-tracking", "Email tracking – Example", ()), 3, 6),
    (_Page("/features/leadboards", "LeadBoards – Example", _VIDEO), 3, 7),
    (_Page("/integrations/hubspot", "HubSpot integration – Example", ()), 2, 4),
    (_Page("/integrations/salesforce", "Salesforce integration – Example", ()), 2, 4),
    (_Page("/customers", "Customer stories – Example", ()), 2, 5),
    (_Page("/customers/northwind-traders", "How Northwind doubled its demo requests – Example", _SCROLL), 1, 4),
    (_Page("/blog/", "Blog – Example", ()), 4, 2),
    (_Page("/blog/what-is-lead-scoring", "What is lead scoring? – Example", _SCROLL), 6, 2),
    (_Page("/blog/b2b-intent-data-explained", "B2B intent data, explained – Example", _SCROLL), 5, 2),
    (_Page("/blog/kanban-for-sales-pipelines", "Kanban for sales pipelines – Example", _SCROLL), 4, 1),
    (_Page("/blog/first-party-cookies-and-gdpr", "First-party cookies and the GDPR – Example", _SCROLL), 4, 1),
    (_Page("/blog/account-based-marketing-playbook", "The ABM playbook – Example", _SCROLL), 4, 2),
    (_Page("/resources/lead-scoring-guide", "The lead scoring guide (PDF) – Example",
           (("download", {"asset": "lead-scoring-guide.pdf"}),)), 1, 3),
    (_Page("/docs/getting-started", "Getting started – Example docs", ()), 2, 3),
    (_Page("/security", "Security & GDPR – Example", ()), 1, 3),
    (_Page("/about", "About us – Example", ()), 2, 1),
    (_Page("/careers", "Careers – Example", ()), 2, 0.5),
    (_Page("/legal/privacy", "Privacy policy – Example", ()), 1, 0.5),
    (_Page("/demo", "Book a demo – Example", (("cta_click", {"cta": "pick-a-time"}),)), 1, 4),
    (_Page("/contact", "Contact sales – Example", (_CHAT,)), 1, 3),
    (_Page("/login", "Log in – Example", ()), 1, 1),
    (_Page("/lp/lead-scoring", "Lead scoring software for B2B teams – Example",
           (("cta_click", {"cta": "hero"}),)), 0, 0),
    (_Page("/thank-you", "Thank you – Example", ()), 0, 0),
)  # fmt: skip
_PAGES = {page.path: page for page, _, _ in _PAGE_ROWS}
_PAGE_LIST = tuple(page for page, _, _ in _PAGE_ROWS)
_BROWSE_CUM = tuple(itertools.accumulate(browse for _, browse, _ in _PAGE_ROWS))
_EVALUATE_CUM = tuple(itertools.accumulate(evaluate for _, _, evaluate in _PAGE_ROWS))
_CRAWLABLE = tuple(page for page, browse, _ in _PAGE_ROWS if browse)
_THANK_YOU_TITLE = _PAGES["/thank-you"].title
_FORMS = (("/demo", "demo-request"), ("/demo", "demo-request"), ("/contact", "contact-sales"),
          ("/resources/lead-scoring-guide", "gated-content"))  # fmt: skip


class _Source(NamedTuple):
    """Where a session comes from: the referrers it shows and the pages it lands on."""

    weight: float
    referrers: tuple[str | None, ...]  # None: no referrer field at all; "": an empty one
    landings: tuple[str, ...]
    utm: str = ""  # query string carried by the landing URL
    click_id: tuple[str, str, int] | None = None  # (parameter, token prefix, token length)


_BLOG_LANDINGS = ("/blog/what-is-lead-scoring", "/blog/b2b-intent-data-explained", "/blog/kanban-for-sales-pipelines",
                  "/blog/first-party-cookies-and-gdpr", "/blog/account-based-marketing-playbook")  # fmt: skip
_DIRECT = _Source(22, (None, ""), ("/", "/", "/pricing", "/login", "/docs/getting-started"))
_SOURCES: tuple[_Source, ...] = (
    _DIRECT,
    _Source(24, ("https://www.google.com/", "https://www.google.co.uk/", "https://www.google.de/"),
            (*_BLOG_LANDINGS, "/", "/features/lead-scoring", "/features/visitor-identification")),
    _Source(5, ("https://www.bing.com/",), (*_BLOG_LANDINGS, "/", "/pricing")),
    _Source(3, ("https://duckduckgo.com/",), (*_BLOG_LANDINGS, "/")),
    _Source(7, ("https://www.linkedin.com/", "https://lnkd.in/"), _BLOG_LANDINGS,
            "utm_source=linkedin&utm_medium=social&utm_campaign=thought-leadership"),
    _Source(3, ("https://t.co/",), _BLOG_LANDINGS),
    _Source(3, ("https://l.facebook.com/", "https://www.facebook.com/"), _BLOG_LANDINGS),
    _Source(9, ("https://www.g2.com/products/example/reviews", "https://www.capterra.com/p/184562/example/",
                "https://zapier.com/apps/example/integrations", "https://news.ycombinator.com/item?id=41022313"),
            ("/", "/integrations/hubspot", "/integrations/salesforce", "/customers")),
    _Source(8, ("https://www.google.com/",), ("/lp/lead-scoring", "/pricing", "/demo"),
            "utm_source=google&utm_medium=cpc&utm_campaign=brand-search&utm_term=lead+scoring+software",
            ("gclid", "Cj0KCQiA", 72)),
    _Source(2, ("https://www.bing.com/",), ("/lp/lead-scoring", "/pricing"),
            "utm_source=bing&utm_medium=cpc&utm_campaign=competitor-terms", ("msclkid", "", 32)),
    _Source(4, ("https://www.linkedin.com/",), ("/lp/lead-scoring", "/demo"),
            "utm_source=linkedin&utm_medium=paid_social&utm_campaign=abm-q4", ("li_fat_id", "", 36)),
    _Source(2, ("https://l.facebook.com/",), ("/lp/lead-scoring",),
            "utm_source=facebook&utm_medium=paid_social&utm_campaign=retargeting", ("fbclid", "IwAR", 60)),
)  # fmt: skip
_SOURCE_CUM = tuple(itertools.accumulate(source.weight for source in _SOURCES))


class _Campaign(NamedTuple):
    id: str
    path: str  # where its main link goes
    send_offset_ms: int  # sent this long after start_ms


_CAMPAIGNS: tuple[_Campaign, ...] = (
    _Campaign("webinar-invite-q4", "/blog/account-based-marketing-playbook", 90 * MINUTE),
    _Campaign("product-update-november", "/features/leadboards", DAY + 6 * HOUR),
    _Campaign("case-study-northwind", "/customers/northwind-traders", 2 * DAY + 2 * HOUR),
    _Campaign("pricing-update", "/pricing", 3 * DAY + 8 * HOUR),
)

# UTC hour-of-day traffic weights (Europe's and the Americas' working hours overlap in the afternoon).
_HOUR_WEIGHTS = (2, 1, 1, 1, 1, 2, 4, 7, 10, 12, 12, 11, 11, 12, 13, 13, 12, 10, 8, 6, 5, 4, 3, 2)
_WEEKEND_FACTOR = 0.35


class _QuickRandom(Random):
    """`random.Random` whose choice() and randrange() cost one random() call. The stdlib's are exact
    (rejection sampling on getrandbits) and several times slower; a 2**-53 bias is irrelevant here."""

    def choice(self, seq: Sequence[_T]) -> _T:
        return seq[int(self.random() * len(seq))]

    def randrange(self, start: int, stop: int | None = None) -> int:  # type: ignore[override]  # no step
        if stop is None:
            start, stop = 0, start
        return start + int(self.random() * (stop - start))


# --------------------------------------------------------------------------------------------------
# The population: who visits, decided up front so that plan() can say what events() will send
# --------------------------------------------------------------------------------------------------


class _Spec(NamedTuple):
    """One person as `_people` draws them: just what fixes how many visitor ids they bring."""

    kind: str  # employee | freemail | anonymous | bot
    variant: str  # freemail: free | disposable; anonymous: "" | junk_identify; bot: crawler | headless | scraper
    company: int  # index into COMPANIES, or -1
    devices: int  # browser visitors: 1, or 2 (a computer and a phone)
    recipient: bool  # on the mailing list: adds a mail-client visitor that opens the campaign


_COMPANY_CUM = tuple(itertools.accumulate(1 / (rank + 1) ** 0.8 for rank in range(len(COMPANIES))))  # Zipf-like
_COMPANY_INDEXES = range(len(COMPANIES))


def _people(visitors: int, seed: int) -> Iterator[_Spec]:
    """Exactly `visitors` visitor ids' worth of people. Replayable: plan() counts it, events() walks it."""
    rng = _QuickRandom(seed)
    remaining = visitors
    while remaining > 0:
        roll = rng.random()
        if roll < 0.08:
            spec = _Spec("bot", rng.choice(("crawler", "crawler", "headless", "scraper")), -1, 1, False)
        elif roll < 0.48:
            spec = _Spec("anonymous", "junk_identify" if rng.random() < 0.02 else "", -1, 1, False)
        elif roll < 0.88:
            company = rng.choices(_COMPANY_INDEXES, cum_weights=_COMPANY_CUM)[0]
            spec = _Spec("employee", "", company, 1 + (rng.random() < 0.2), rng.random() < 0.35)
        else:
            variant = "disposable" if rng.random() < 0.06 else "free"
            spec = _Spec("freemail", variant, -1, 1 + (rng.random() < 0.2), rng.random() < 0.5)
        while spec.devices + spec.recipient > remaining:
            spec = spec._replace(recipient=False) if spec.recipient else spec._replace(devices=1)
        remaining -= spec.devices + spec.recipient
        yield spec


@dataclass(frozen=True)
class TrafficMix:
    """What a generator will send, by scenario (people and visitor ids, not events)."""

    visitors: int = 0  # distinct visitor ids, mail clients included
    people: int = 0
    companies: int = 0  # distinct companies with at least one visiting employee
    company_employees: int = 0
    freemail_leads: int = 0  # personal address, fill in a form
    disposable_signups: int = 0  # of which use a throwaway address
    anonymous: int = 0  # humans who never identify
    junk_identifies: int = 0  # of which send an illegal id ("undefined", "null", ...)
    bots: int = 0  # crawlers, headless browsers and datacenter scrapers
    datacenter_scrapers: int = 0  # of which hide behind a browser user agent
    email_recipients: int = 0  # each adds a mail-client visitor
    multi_device_people: int = 0

    def __str__(self) -> str:
        return ", ".join(f"{name.replace('_', ' ')} {count:,}" for name, count in asdict(self).items())


_VARIANT_FIELDS = {
    "disposable": "disposable_signups", "junk_identify": "junk_identifies", "scraper": "datacenter_scrapers",
}  # fmt: skip
_KIND_FIELDS = {"employee": "company_employees", "freemail": "freemail_leads", "anonymous": "anonymous", "bot": "bots"}


def plan(visitors: int, seed: int = 7) -> TrafficMix:
    """The scenario counts `TrafficGenerator(visitors, seed)` will produce, without generating events."""
    counts = dict.fromkeys(_KIND_FIELDS.values(), 0) | dict.fromkeys(_VARIANT_FIELDS.values(), 0)
    people = recipients = multi_device = 0
    companies: set[int] = set()
    for spec in _people(visitors, seed):
        people += 1
        counts[_KIND_FIELDS[spec.kind]] += 1
        if spec.variant in _VARIANT_FIELDS:
            counts[_VARIANT_FIELDS[spec.variant]] += 1
        recipients += spec.recipient
        multi_device += spec.devices > 1
        if spec.company >= 0:
            companies.add(spec.company)
    return TrafficMix(visitors=visitors, people=people, companies=len(companies), email_recipients=recipients,
                      multi_device_people=multi_device, **counts)  # fmt: skip


def _arrival_times(rng: Random, count: int, start_ms: int) -> Iterator[int]:
    """`count` first-visit times in ascending order, denser in working hours and on weekdays.

    Sorted uniforms drawn one at a time (Bentley & Saxe), mapped through the cumulative hourly
    intensity: a million people need neither a list nor a sort.
    """
    first_hour = start_ms // HOUR
    weights = [
        _HOUR_WEIGHTS[hour % 24] * (_WEEKEND_FACTOR if (hour // 24 + 3) % 7 >= 5 else 1)  # 1970-01-01 was a Thursday
        for hour in range(first_hour, first_hour + _SPAWN_HOURS)
    ]
    cumulative = list(itertools.accumulate(weights))
    total = cumulative[-1]
    position = 0.0
    for left in range(count, 0, -1):
        position = 1.0 - (1.0 - position) * rng.random() ** (1.0 / left)
        target = position * total
        hour = min(bisect_right(cumulative, target), _SPAWN_HOURS - 1)
        before = cumulative[hour - 1] if hour else 0.0
        yield start_ms + int((hour + min((target - before) / weights[hour], 1.0)) * HOUR)


# --------------------------------------------------------------------------------------------------
# Formatting helpers (hot path)
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def rfc3339_writer(offset_minutes: int, with_millis: bool) -> Callable[[int], str]:
    """Epoch ms -> RFC 3339 local time with its UTC offset, in one fixed style, built once per style so that
    formatting only divides."""
    hours, minutes = divmod(abs(offset_minutes), 60)
    zone = f"{'-' if offset_minutes < 0 else '+'}{hours:02d}:{minutes:02d}" if offset_minutes else "Z"
    shift = offset_minutes * MINUTE

    def write(ms: int) -> str:
        day, rest = divmod(ms + shift, DAY)
        minute, millis = divmod(rest, MINUTE)
        if with_millis:
            return _date_prefix(day) + _HOURS_MINUTES[minute] + "%02d.%03d" % divmod(millis, 1000) + zone
        return _date_prefix(day) + _HOURS_MINUTES[minute] + "%02d" % (millis // 1000) + zone  # truncated to the second

    return write


@lru_cache(maxsize=64)
def _date_prefix(epoch_day: int) -> str:
    return time.strftime("%Y-%m-%dT", time.gmtime(epoch_day * 86_400))


_HOURS_MINUTES = tuple(f"{hour:02d}:{minute:02d}:" for hour in range(24) for minute in range(60))


# How event times are written, per visitor (one tracker version per browser); None: epoch ms. Repeats are weights.
_TS_WRITERS: tuple[Callable[[int], str] | None, ...] = (
    None, None, None, None, None, rfc3339_writer(0, True), rfc3339_writer(0, True), rfc3339_writer(60, True),
    rfc3339_writer(-300, True), rfc3339_writer(330, False), rfc3339_writer(0, False),
)  # fmt: skip
_EMAIL_TOOL_TS_WRITER = rfc3339_writer(0, True)


@lru_cache(maxsize=256)
def _ascii_slug(text: str) -> str:
    """What a name becomes in an email address: "van der Berg" -> "vanderberg", "Zoë" -> "zoe"."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(char for char in plain.lower() if char.isalnum())


# --------------------------------------------------------------------------------------------------
# The simulation
# --------------------------------------------------------------------------------------------------


class _Person:
    """Who is behind one or more visitor ids. Anonymous people and bots leave the identity fields empty."""

    __slots__ = ("first_name", "last_name", "email", "company", "job_title", "evaluating", "campaign")

    def __init__(self) -> None:
        self.first_name = self.last_name = self.email = self.company = self.job_title = ""
        self.evaluating = False  # evaluating the product: reads pricing and features rather than the blog
        self.campaign: _Campaign | None = None


class _Visitor:
    """One visitor id (a browser, a mail client or a bot) and its schedule."""

    __slots__ = ("visitor_id", "key", "site_id", "base_url", "person", "role", "user_agent", "write_ts", "extra",
                 "common_fields", "home_ip", "office", "referrer_events", "sessions_left", "sessions_done",
                 "history_end", "actions", "known", "email_landing")  # fmt: skip

    def __init__(self, visitor_id: str, site_id: str, base_url: str, person: _Person, role: str, history_end: int):
        self.visitor_id = visitor_id
        self.key = visitor_id.encode()
        self.site_id = site_id
        self.base_url = base_url
        self.person = person
        self.role = role  # browser | mail | bot
        self.user_agent = ""
        self.write_ts: Callable[[int], str] | None = None  # None: epoch ms
        self.common_fields: dict[str, str] = {}  # what all its events carry; set when its first session starts
        self.extra: dict[str, str] | None = None  # unknown top-level fields some tracker versions send
        self.home_ip = ""
        self.office = -1  # company index whose office network this visitor is usually on
        self.referrer_events = False  # this tracker version also sends a `referrer` event on landing
        self.sessions_left = 1
        self.sessions_done = 0
        self.history_end = history_end
        self.actions: dict[int, str] = {}  # session index -> form | login | junk_identify
        self.known = False  # has identified: the tracker re-identifies it now and then
        self.email_landing: tuple[str, str | None] | None = None  # first session is an email click: (url, referrer)


_WINDOW_MS = MINUTE  # messages are collected per minute of arrival, then sorted and sent
# Time on a page: 2 s + this * U³, i.e. 2 s to 4 min, mostly short (median ~32 s); far below the 30 min timeout.
_DWELL_SPAN_MS = 240_000
_ARRIVAL = itemgetter(0)


class TrafficGenerator:
    """Realistic tracking traffic as (key = visitor_id bytes, value = JSON bytes) messages.

    Counters fill in as messages are yielded: `valid` (duplicates included), `duplicates` (re-sent copies
    of a valid event, same bytes, which the pipeline must drop), `malformed` (by the DLQ reason each was
    built to get) and `by_type` (distinct valid events). Calling `events()` again restarts them and
    yields the same bytes.
    """

    def __init__(
        self,
        visitors: int,
        seed: int = 7,
        site_ids: Sequence[str] = ("demo",),
        start_ms: int = DEFAULT_START_MS,
        malformed_ratio: float = 0.002,
        duplicate_ratio: float = 0.001,
        now_ms: int | None = None,
    ) -> None:
        """`now_ms` is the receiver's clock, for the ts_in_future messages (3 days past it); unknown, they
        are dated 2100, in the future whenever the traffic is sent."""
        if visitors < 0:
            raise ValueError("visitors must be >= 0")
        if not site_ids:
            raise ValueError("at least one site id is needed")
        if not (0 <= malformed_ratio < 1 and 0 <= duplicate_ratio < 1 and malformed_ratio + duplicate_ratio < 1):
            raise ValueError("malformed_ratio and duplicate_ratio must be in [0, 1) and sum to less than 1")
        self.visitors = visitors
        self.seed = seed
        self.site_ids = tuple(site_ids)
        self.start_ms = start_ms
        self.malformed_ratio = malformed_ratio
        self.duplicate_ratio = duplicate_ratio
        self.site_urls = {site: f"https://{_site_host(index)}" for index, site in enumerate(self.site_ids)}
        self.mix = plan(visitors, seed)
        self._future_ms = (_UNKNOWN_NOW_MS if now_ms is None else now_ms) + 3 * DAY
        self._broken_below = duplicate_ratio + malformed_ratio
        self._campaign_sends = [start_ms + campaign.send_offset_ms for campaign in _CAMPAIGNS]
        self._counts = dict.fromkeys(_TAGS, 0)
        self._rng = _QuickRandom()
        self._agenda: list[tuple[int, int, _Visitor | None]] = []  # see events()
        self._tick = itertools.count()  # agenda tie-breaker: equal times keep insertion order
        self._outbox: defaultdict[int, list[tuple[int, bytes, bytes, str]]] = defaultdict(list)

    @property
    def by_type(self) -> dict[str, int]:
        return {event_type: self._counts[event_type] for event_type in EVENT_TYPES}

    @property
    def duplicates(self) -> int:
        return self._counts[_DUPLICATE]

    @property
    def valid(self) -> int:
        return sum(self.by_type.values()) + self.duplicates

    @property
    def malformed(self) -> dict[str, int]:
        return {reason: self._counts[reason] for reason in MALFORMED_REASONS}

    def events(self) -> Iterator[tuple[bytes, bytes]]:
        """All messages in arrival order: a discrete-event simulation, one minute of arrivals at a time.

        The agenda (a heap) holds the next person to appear (visitor None) and the visitors waiting for
        their next session. A session is generated whole when it starts; its messages go to the outbox
        under their minute of arrival. Once every session starting before a minute's end has run, that
        minute is complete: sort it, send it. Memory follows the visitors active at once, not the run.
        """
        self._counts = counts = dict.fromkeys(_TAGS, 0)
        self._rng = rng = _QuickRandom(f"{self.seed}|{'|'.join(self.site_ids)}")  # ids differ per site, mix does not
        self._agenda = agenda = []
        self._tick = itertools.count()
        self._outbox = outbox = defaultdict(list)
        people = _people(self.visitors, self.seed)
        arrivals = _arrival_times(rng, self.mix.people, self.start_ms)
        first = next(arrivals, None)
        if first is not None:
            self._schedule(first, None)
        while agenda or outbox:
            window = min(outbox) if outbox else agenda[0][0] // _WINDOW_MS
            if agenda:
                window = min(window, agenda[0][0] // _WINDOW_MS)
            window_end = (window + 1) * _WINDOW_MS
            while agenda and agenda[0][0] < window_end:
                when, _, visitor = heapq.heappop(agenda)
                if visitor is not None:
                    self._run_session(visitor, when)
                    continue
                self._spawn(next(people), when)
                arrival = next(arrivals, None)
                if arrival is not None:
                    self._schedule(arrival, None)
            messages = outbox.pop(window, None)
            if messages:
                messages.sort(key=_ARRIVAL)
                for _, key, value, tag in messages:
                    counts[tag] += 1
                    yield key, value

    def _schedule(self, at: int, visitor: _Visitor | None) -> None:
        heapq.heappush(self._agenda, (at, next(self._tick), visitor))

    # -- people and visitors -------------------------------------------------------------------------

    def _spawn(self, spec: _Spec, now: int) -> None:
        """A person shows up: their visitor ids are created and each one's first session is scheduled."""
        rng = self._rng
        site_id = rng.choice(self.site_ids)
        base_url = self.site_urls[site_id]
        person = _Person()
        history_end = now + _HISTORY_MS

        def visitor(role: str) -> _Visitor:
            return _Visitor(self._uuid(), site_id, base_url, person, role, history_end)

        if spec.kind == "bot":
            bot = visitor("bot")
            if spec.variant == "crawler":
                bot.user_agent = rng.choice(CRAWLER_USER_AGENTS)
            elif spec.variant == "headless":
                bot.user_agent = HEADLESS_USER_AGENT
            else:  # a scraper posing as a browser: only its datacenter address gives it away
                bot.user_agent = rng.choice(DESKTOP_USER_AGENTS)
            bot.sessions_left = rng.randint(1, 3)
            self._schedule(now, bot)
            return

        main = visitor("browser")
        self._equip_browser(main, spec, mobile=rng.random() < (0.5 if spec.kind == "anonymous" else 0.2))
        if spec.kind == "anonymous":
            main.sessions_left = 1 + (rng.random() < 0.25) + (rng.random() < 0.08)
            if spec.variant == "junk_identify":
                main.actions[0] = "junk_identify"
            self._schedule(now, main)
            return

        self._name(person, spec)
        person.evaluating = rng.random() < (0.45 if spec.kind == "employee" else 0.6)
        main.sessions_left = 1 + min(int(rng.expovariate(1 / (2.2 if spec.kind == "employee" else 1.4))), 7)
        if spec.kind == "freemail" or rng.random() < 0.3:
            main.actions[rng.randrange(main.sessions_left)] = "form"
        first_session = now
        if spec.recipient:
            first_session = self._spawn_recipient(person, visitor("mail"), main, now)
        self._schedule(first_session, main)
        if spec.devices > 1:
            phone = visitor("browser")
            self._equip_browser(phone, spec, mobile=True)
            phone.sessions_left = 1 + (rng.random() < 0.4)
            if rng.random() < 0.6:
                phone.actions[phone.sessions_left - 1] = "login"
            self._schedule(now + rng.randrange(HOUR, 3 * DAY), phone)

    def _spawn_recipient(self, person: _Person, mail: _Visitor, main: _Visitor, now: int) -> int:
        """Campaign opens from a mail-client visitor; some click through. Returns `main`'s first session."""
        rng = self._rng
        sent = self._campaign_sends
        latest = bisect_right(sent, now) - 1
        person.campaign = _CAMPAIGNS[max(latest, 0)]
        opened = now if latest >= 0 else max(now, sent[0] + rng.randrange(2 * MINUTE, 3 * HOUR))
        mail.user_agent = rng.choice(MAIL_CLIENT_USER_AGENTS)
        mail.write_ts = _EMAIL_TOOL_TS_WRITER
        mail.home_ip, mail.office = main.home_ip, main.office
        mail.sessions_left = 1 + (rng.random() < 0.3)
        self._schedule(opened, mail)
        if rng.random() >= 0.45:
            return now
        campaign = person.campaign
        url = (f"{main.base_url}{campaign.path}?utm_source=newsletter&utm_medium=email"
               f"&utm_campaign={campaign.id}&lb_email={quote(person.email, safe='')}")  # fmt: skip
        main.email_landing = (url, _WEBMAIL_REFERRERS.get(person.email.rpartition("@")[2]))
        return opened + rng.randrange(15_000, 20 * MINUTE)

    def _equip_browser(self, v: _Visitor, spec: _Spec, mobile: bool) -> None:
        rng = self._rng
        v.user_agent = rng.choice(MOBILE_USER_AGENTS if mobile else DESKTOP_USER_AGENTS)
        v.write_ts = rng.choice(_TS_WRITERS)
        v.extra = rng.choice(_SDK_EXTRAS) if rng.random() < 0.3 else None
        v.referrer_events = rng.random() < 0.4
        if mobile:
            v.home_ip = rng.choice(_MOBILE_V4_HOSTS) if rng.random() < 0.7 else self._v6(_residential_v6_prefix(rng))
        else:
            v.home_ip = rng.choice(_HOME_V4_HOSTS) if rng.random() < 0.85 else self._v6(_residential_v6_prefix(rng))
            if spec.kind == "employee" and rng.random() < 0.75:
                v.office = spec.company

    def _v6(self, prefix: str) -> str:
        """A host address in the /48 whose first three groups are `prefix`."""
        rng = self._rng
        return f"{prefix}:{rng.getrandbits(16):x}::{rng.randrange(1, 0x10000):x}"

    def _name(self, person: _Person, spec: _Spec) -> None:
        rng = self._rng
        person.first_name, person.last_name = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        first, last = _ascii_slug(person.first_name), _ascii_slug(person.last_name)
        if spec.kind == "employee":
            company = COMPANIES[spec.company]
            pattern = _EMAIL_LOCAL_PATTERNS[spec.company % len(_EMAIL_LOCAL_PATTERNS)]  # one convention per company
            local = pattern.format(first=first, f=first[0], last=last)
            subdomain = rng.choice(company.email_subdomains) if company.email_subdomains and rng.random() < 0.4 else ""
            person.email = f"{local}@{subdomain}{company.domain}"
            person.company = company.name
        else:
            domain = rng.choice(DISPOSABLE_DOMAINS if spec.variant == "disposable" else FREE_MAIL_DOMAINS)
            local = f"{first}.{last}{rng.randrange(100)}" if rng.random() < 0.6 else first + last
            person.email = f"{local}@{domain}"
            person.company = rng.choice(("", "Freelance", f"{person.last_name} Consulting", rng.choice(COMPANIES).name))
        person.job_title = rng.choice(JOB_TITLES)

    # -- sessions ------------------------------------------------------------------------------------

    def _run_session(self, v: _Visitor, start: int) -> None:
        if not v.sessions_done:  # everything about the visitor is settled by now
            v.common_fields = {"site_id": v.site_id, "visitor_id": v.visitor_id, "user_agent": v.user_agent}
            v.common_fields.update(v.extra or {})
        if v.role == "browser":
            end = self._browse(v, start)
        elif v.role == "mail":
            end = self._mail_open(v, start)
        else:
            end = self._crawl(v, start)
        v.sessions_done += 1
        v.sessions_left -= 1
        if v.sessions_left:
            next_start = end + self._gap()
            if next_start < v.history_end:
                self._schedule(next_start, v)

    def _gap(self) -> int:
        """From a session's last page to the next session: beyond the 30 min inactivity timeout even
        counting the custom events and late deliveries that trail the last page by up to a minute."""
        rng = self._rng
        roll = rng.random()
        if roll < 0.45:
            return rng.randrange(35 * MINUTE, 5 * HOUR)
        if roll < 0.85:
            return rng.randrange(16 * HOUR, 30 * HOUR)
        return rng.randrange(40 * HOUR, 80 * HOUR)

    def _session_ip(self, v: _Visitor) -> str:
        rng = self._rng
        if v.office < 0 or rng.random() < 0.2:  # working from home now and then
            return v.home_ip
        if v.office % 5 == 0 and rng.random() < 0.5:  # every fifth company's office also has IPv6
            return self._v6(_OFFICE_V6_PREFIXES[v.office])
        return rng.choice(_OFFICE_V4_HOSTS[v.office])

    def _landing(self, v: _Visitor) -> tuple[_Page, str, str | None]:
        """(landing page, its URL, external referrer) for a session that does not start with an email click."""
        rng = self._rng
        returning_direct = v.sessions_done and rng.random() < 0.35  # bookmarks and typed URLs
        source = _DIRECT if returning_direct else rng.choices(_SOURCES, cum_weights=_SOURCE_CUM)[0]
        page = _PAGES[rng.choice(source.landings)]
        query = source.utm
        if source.click_id is not None:
            name, prefix, length = source.click_id
            token = prefix + base64.urlsafe_b64encode(rng.randbytes(length)).decode()[: length - len(prefix)]
            query = f"{query}&{name}={token}" if query else f"{name}={token}"
        url = f"{v.base_url}{page.path}?{query}" if query else v.base_url + page.path
        return page, url, rng.choice(source.referrers)

    def _browse(self, v: _Visitor, start: int) -> int:
        """A human session; returns the time of its last page."""
        rng = self._rng
        person = v.person
        action = v.actions.get(v.sessions_done)
        ip = self._session_ip(v)
        ts = start
        if v.email_landing is not None and v.sessions_done == 0:
            landing_url, referrer = v.email_landing
            campaign = person.campaign
            assert campaign is not None
            click = {"url": landing_url, "campaign": campaign.id}
            if rng.random() < 0.5:  # else the address is only in ?lb_email=
                click["email"] = person.email
            self._emit(v, "email_click", ts, ip, click)
            v.known = True
            ts += rng.randrange(300, 2500)
            pages = [_PAGES[campaign.path]]
        else:
            landing, landing_url, referrer = self._landing(v)
            pages = [landing]
        cumulative = _EVALUATE_CUM if person.evaluating else _BROWSE_CUM
        extra_pages = min(int(rng.expovariate(1 / (3.0 if person.evaluating else 1.3))), 14)
        if extra_pages:  # half the sessions bounce
            pages += rng.choices(_PAGE_LIST, cum_weights=cumulative, k=extra_pages)
        form = rng.choice(_FORMS) if action == "form" else None
        if form is not None:
            pages.append(_PAGES[form[0]])
        elif action == "login":
            pages.insert(1, _PAGES["/login"])

        if v.known and rng.random() < 0.4:
            self._identify(v, ts, landing_url, ip, "returning")
            ts += rng.randrange(5, 200)
        if referrer and v.referrer_events:
            self._emit(v, "referrer", ts + 3, ip, {"url": landing_url, "referrer": referrer})
        if action == "junk_identify":
            self._emit(v, "identify", ts + 50, ip, {"url": landing_url, "email": rng.choice(_JUNK_IDS)})
        previous, url, base_url, random = referrer, landing_url, v.base_url, rng.random
        for index, page in enumerate(pages):
            if index:
                ts += 2000 + int(random() ** 3 * _DWELL_SPAN_MS)
                url = base_url + page.path
            self._emit(v, "pageview", ts, ip, {"url": url, "title": page.title} if previous is None else
                       {"url": url, "referrer": previous, "title": page.title})  # fmt: skip
            if page.custom_events and random() < 0.15:
                name, properties = rng.choice(page.custom_events)
                custom = {"url": url, "name": name, "properties": properties}
                self._emit(v, "custom", ts + rng.randrange(2000, 30_000), ip, custom)
            if page.path == "/login" and action == "login":
                ts += rng.randrange(4000, 20_000)
                self._identify(v, ts, url, ip, "login")
            previous = url
        if form is not None:
            ts += rng.randrange(20_000, 120_000)
            self._form_submit(v, ts, previous, ip, form[1])  # type: ignore[arg-type]
            ts += rng.randrange(800, 2500)
            thanks = base_url + "/thank-you"
            self._emit(v, "pageview", ts, ip, {"url": thanks, "referrer": previous, "title": _THANK_YOU_TITLE})
            previous = thanks
        if random() < 0.7:
            dwell = 2000 + int(random() ** 3 * _DWELL_SPAN_MS)
            self._emit(v, "exit", ts + dwell, ip, {"url": previous, "properties": {"time_on_page_s": dwell // 1000}})
        return ts

    def _mail_open(self, v: _Visitor, start: int) -> int:
        campaign = v.person.campaign
        assert campaign is not None
        self._emit(v, "email_open", start, self._session_ip(v), {"email": v.person.email, "campaign": campaign.id})
        return start

    def _crawl(self, v: _Visitor, start: int) -> int:
        """Many distinct pages, seconds apart, from a datacenter; crawlers send no referrer."""
        rng = self._rng
        ip = rng.choice(_DATACENTER_V4_HOSTS) if rng.random() < 0.8 else self._v6("2001:db8:ffff")
        with_referrer = v.user_agent == HEADLESS_USER_AGENT or v.user_agent in DESKTOP_USER_AGENTS
        ts, previous = start, None
        for page in rng.sample(_CRAWLABLE, rng.randint(5, len(_CRAWLABLE))):
            url = v.base_url + page.path
            self._emit(v, "pageview", ts, ip, {"url": url, "referrer": previous, "title": page.title}
                       if previous and with_referrer else {"url": url, "title": page.title})  # fmt: skip
            previous = url
            ts += 300 + int(rng.random() * 5700)
        return ts

    # -- events --------------------------------------------------------------------------------------

    def _uuid(self) -> str:
        digits = "%032x" % self._rng.getrandbits(128)
        return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"

    def _identify(self, v: _Visitor, ts: int, url: str, ip: str, source: str) -> None:
        self._emit(v, "identify", ts, ip, {"url": url, "email": v.person.email, "properties": {"source": source}})
        v.known = True

    def _form_submit(self, v: _Visitor, ts: int, url: str, ip: str, form: str) -> None:
        rng = self._rng
        person = v.person
        email = person.email
        roll = rng.random()
        if roll < 0.08:
            email = email.title()  # typed with capitals: the pipeline must normalise
        elif roll < 0.11:
            email = f" {email} "
        properties: dict[str, str | bool] = {
            "form": form,
            "first_name": person.first_name,
            "last_name": person.last_name,
            "company": person.company,
            "job_title": person.job_title,
            "consent": True,
        }
        if rng.random() < 0.03:
            field, value = rng.choice(_HOSTILE_FORM_VALUES)
            properties[field] = value
        self._emit(v, "form_submit", ts, ip, {"url": url, "email": email, "properties": properties})
        v.known = True

    def _emit(self, v: _Visitor, event_type: str, ts: int, ip: str, fields: dict) -> None:
        """Build one event (what every event of `v` carries, plus `fields`) and queue it under its minute
        of arrival: now and then delivered a few seconds late, sent twice, or followed by a broken copy."""
        rng = self._rng
        write_ts = v.write_ts
        event = {
            "event_id": "%032x" % rng.getrandbits(128),  # unique; cheaper than UUID dashes
            "type": event_type,
            "ts": ts if write_ts is None else write_ts(ts),
            **v.common_fields,
            "ip": ip,
            **fields,
        }
        value = orjson.dumps(event)
        arrival = ts + rng.randrange(500, 4000) if rng.random() < 0.05 else ts
        outbox = self._outbox
        outbox[arrival // _WINDOW_MS].append((arrival, v.key, value, event_type))
        roll = rng.random()
        if roll < self.duplicate_ratio:
            arrival += rng.randrange(300, 15_000)
            outbox[arrival // _WINDOW_MS].append((arrival, v.key, value, _DUPLICATE))
        elif roll < self._broken_below:
            arrival += rng.randrange(1, 2000)
            outbox[arrival // _WINDOW_MS].append(self._malformed(event, v.key, arrival))

    def _malformed(self, event: dict, key: bytes, arrival: int) -> tuple[int, bytes, bytes, str]:
        """A broken copy of `event` (with its own event_id) that the pipeline must refuse with `reason`."""
        rng = self._rng
        reason = rng.choice(MALFORMED_REASONS)
        broken = {**event, "event_id": "%032x" % rng.getrandbits(128)}
        if reason == "bad_json":
            text = orjson.dumps(broken)[:-1]
            return arrival, key, text if rng.random() < 0.5 else text + b",}", reason  # truncated, or a trailing comma
        if reason == "missing_field":
            del broken[rng.choice(("event_id", "event_id", "event_id", "ts", "site_id", "type"))]
        elif reason == "wrong_type":
            broken["ts"] = rng.choice((True, [broken["ts"]], {"$date": broken["ts"]}))
        elif reason == "unknown_event_type":
            broken["type"] = rng.choice(("page_view", "click", "purchase", "session_start"))
        elif reason == "ts_in_future":
            broken["ts"] = self._future_ms + rng.randrange(HOUR)
        elif reason == "oversized":
            broken["properties"] = {"debug_dump": _OVERSIZED_TEXT}
        else:  # invalid_value: control characters in the visitor id (and so in the key)
            visitor_id = broken["visitor_id"]
            broken["visitor_id"] = f"{visitor_id[:8]}\x00\x1b[2J{visitor_id[8:]}"
            key = broken["visitor_id"].encode()
        return arrival, key, orjson.dumps(broken), reason


def _site_host(index: int) -> str:
    """Documentation domains (RFC 2606) for the tracked sites themselves."""
    return ("www.example.com", "www.example.net", "www.example.org")[index] if index < 3 else f"site{index}.example.com"


def generate(
    visitors: int,
    seed: int = 7,
    site_ids: Sequence[str] = ("demo",),
    start_ms: int = DEFAULT_START_MS,
    malformed_ratio: float = 0.002,
) -> Iterator[tuple[bytes, bytes]]:
    """Just the messages, for callers that need no counters."""
    return TrafficGenerator(visitors, seed, site_ids, start_ms, malformed_ratio).events()


def ip_range_table_lines() -> list[str]:
    """The IP-range table for this traffic (cidr,domain,company_name,kind,country,region,city), as
    `IpRangeTable.from_lines` reads it: load it and anonymous office visitors resolve to their company's
    account, and every address has a country (documentation addresses are in no geo data)."""
    lines = ["cidr,domain,company_name,kind,country,region,city"]
    for company in COMPANIES:
        place = f"{company.country},{company.region},{company.city}"
        lines.append(f"{company.office_v4},{company.domain},{company.name},company,{place}")
        lines.append(f"{company.office_v6},{company.domain},{company.name},company,{place}")
    lines.extend(f"{cidr},,{owner},{kind},{country}" for cidr, owner, kind, country in _NETWORKS)
    return lines


def company_card_rows() -> list[dict[str, str]]:
    """Company cards for this traffic's companies, as `leadstream companies load` reads them (one dict per
    JSON Lines row). Fictitious: the web and LinkedIn addresses are made up like the companies."""
    return [{"domain": company.domain, "name": company.name, "industry": company.industry,
             "employees": company.employees, "country": company.country, "website": f"https://www.{company.domain}/",
             "linkedin_url": f"https://www.linkedin.com/company/{_ascii_slug(company.name)}",
             "logo_url": f"https://www.{company.domain}/logo.png", "source": "demo"}
            for company in COMPANIES]
