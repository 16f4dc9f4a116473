"""`leadstream` — one console script for every role: stack, migrate, worker, sink, demo, bench."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from schemas.settings import BatchConfig, Settings

# Every other command reads the servers' passwords (and `api` the API keys and the server secret) from the
# settings, and refuses to start with a weak one. These run on the local stack and make their own.
LOCAL_STACK_COMMANDS = ("stack", "demo", "bench", "bench-profile")


def _run_sink(settings: Settings, tables: list[str]) -> int:
    from sinks.table_sink import run_sinks

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_sinks(settings.kafka(), settings.clickhouse(),
                        BatchConfig(settings.sink_batch_size, settings.sink_batch_ms), tables, stop,
                        retention=settings.retention())

    asyncio.run(main())
    return 0


def _clickhouse_query(settings: Settings):
    """A query function for the worker's segment backfill job (processors cannot import the sinks)."""
    from sinks import clickhouse

    config = settings.clickhouse()

    def query(sql: str, params: dict) -> list[tuple]:
        client = clickhouse.connect(config)
        try:
            return client.execute(sql, params)
        finally:
            client.disconnect()

    return query


def _migrate(settings: Settings) -> int:
    from leadstream.topics import ensure_topics
    from sinks.clickhouse import migrate

    print("Kafka topics:", flush=True)
    asyncio.run(ensure_topics(settings.kafka()))
    print("ClickHouse schema:", flush=True)
    migrate(settings.clickhouse())
    _retention(settings, ttl_only=True)
    return 0


def _retention(settings: Settings, ttl_only: bool = False) -> int:
    """Apply the retention settings now: TTLs on a server that has them (also what `migrate` does), else
    (`leadstream retention run`) drop and delete what is older."""
    from sinks import clickhouse, retention

    client = clickhouse.connect(settings.clickhouse())
    try:
        if ttl_only:
            if not retention.supports_ttl(client.execute("SELECT version()")[0][0]):
                print("  retention: this server has no table TTL; the sinks delete old rows once a day "
                      "(`leadstream retention run` does it now)", flush=True)
                return 0
            rows = retention.reconcile_ttl(client, settings.retention())
        else:
            rows = retention.run_retention(client, settings.retention(), sharded=settings.clickhouse())
    finally:
        client.disconnect()
    for row in rows:
        detail = f", {row.rows:,} rows before {row.cutoff}" if row.rows else ""
        partitions = f" ({', '.join(row.partitions)})" if row.partitions else ""
        print(f"  retention: {row.table_name} keeps {row.days} days: {row.action}{partitions}{detail}", flush=True)
    if ttl_only and not rows:
        print("  retention: every table's TTL is as the settings say", flush=True)
    return 0


class _DeprecatedAlias(argparse.Action):
    """An option's old name, still accepted (users' scripts and compose files have it) with a one-line warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is deprecated; use --{self.dest}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="leadstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    stack = sub.add_parser("stack", help="local Kafka + ClickHouse + Redis as plain processes")
    stack.add_argument("action", choices=["up", "down", "status", "env", "promote-redis"],
                       help="env: the LEADSTREAM_* exports that point the other commands at this stack; "
                            "promote-redis (--cluster): make the Redis replica the primary")
    stack.add_argument("--cluster", action="store_true",
                       help="the cluster stack (3 Kafka brokers, Redis primary + replica) on ports of its own")
    sub.add_parser("migrate", help="create Kafka topics and apply ClickHouse migrations")
    worker = sub.add_parser("worker", help="run a Faust stream-processing worker")
    worker.add_argument("--name", default="worker", help="distinct name per worker process on one host")
    worker.add_argument("--loglevel", default="warning")
    worker.add_argument("--processors", default="",
                        help="comma-separated subset of raw,lead,account,board,webhooks (default: all)")
    worker.add_argument("--stages", dest="processors", action=_DeprecatedAlias, default=argparse.SUPPRESS,
                        help="deprecated name of --processors")
    sub.add_parser("api", help="run the read API and dashboard (LEADSTREAM_API_KEYS=site:key,...)")
    sink = sub.add_parser("sink", help="run the ClickHouse sinks")
    sink.add_argument("--tables", default="", help="comma-separated table names (default: all)")
    ip_ranges = sub.add_parser("ip-ranges", help="load the IP-range -> company table (CSV: cidr,domain,company_name"
                                                 "[,kind[,country[,region[,city[,asn]]]]])")
    ip_ranges.add_argument("action", choices=["load"])
    ip_ranges.add_argument("path")
    companies = sub.add_parser("companies", help="load company cards (CSV with a header, or JSON Lines): domain, name,"
                                                 " industry, employees, country, website, linkedin_url, logo_url")
    companies.add_argument("action", choices=["load"])
    companies.add_argument("path", help="FILE.csv or FILE.jsonl")
    account = sub.add_parser("account", help="add an account by hand, by domain")
    account.add_argument("action", choices=["add"])
    account.add_argument("domain")
    account.add_argument("--site", required=True)
    account.add_argument("--name", default="", help="company name")
    for kind, extra in (("rules", []), ("segments", []), ("boards", ["rebuild"]), ("owners", [])):
        definitions = sub.add_parser(kind, help=f"{kind}: apply a YAML/JSON file (rules, segments, boards and owners), "
                                     "list them" + (", rebuild the board state from Kafka" if extra else ""))
        definitions.add_argument("action", choices=["apply", "list", *extra])
        definitions.add_argument("path", nargs="?", help="the YAML or JSON file (apply)")
        definitions.add_argument("--site", help="the site (apply, list)")
    retention = sub.add_parser("retention", help="apply the retention settings now: set table TTLs, or (ClickHouse "
                                                 "without TTL) drop and delete rows older than each table's days")
    retention.add_argument("action", choices=["run"])
    hooks = sub.add_parser("webhooks", help="webhook deliveries: replay one with the same webhook-id")
    hooks.add_argument("action", choices=["replay"])
    hooks.add_argument("webhook_id")
    erase = sub.add_parser("erase", help="erase a person everywhere and keep them erased (right to be forgotten); "
                                         "--status ID: how an erasure is going")
    erase.add_argument("--site", required=True)
    erase.add_argument("--email", default="")
    erase.add_argument("--lead", default="", help="a lead id (an anonymous lead, say)")
    erase.add_argument("--wait", action="store_true", help="block until ClickHouse has deleted every row")
    erase.add_argument("--status", default="", metavar="ID", help="the status of an earlier erasure")
    export = sub.add_parser("export-person", help="everything stored on a person, as one JSON document (access request)")
    export.add_argument("--site", required=True)
    export.add_argument("--email", required=True)
    demo = sub.add_parser("demo", help="the whole pipeline on the local stack with synthetic traffic")
    demo.add_argument("--visitors", type=int, default=3000)
    demo.add_argument("--seed", type=int, default=7)
    bench = sub.add_parser("bench", help="throughput/latency/memory benchmark vs a raw aiokafka loop")
    bench.add_argument("--events", type=int, default=200_000)
    bench.add_argument("--open-sessions", type=int, default=100_000)
    bench.add_argument("--layout", choices=["split", "single"], default="split",
                       help="worker processes of the main phase: split (raw processor | lead,account,board,webhooks) or"
                            " single (every processor in one); with split, a phase with a single worker follows for"
                            " comparison")
    bench.add_argument("--workers", type=int, default=2,
                       help="single-layout worker processes of the scale-out phase (1: leave it out)")
    bench_profile = sub.add_parser("bench-profile", help="Lead Profile and funnel latency over N events in ClickHouse")
    bench_profile.add_argument("--events", type=int, default=10_000_000)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command not in LOCAL_STACK_COMMANDS:
        try:
            settings.refuse_weak_secrets(api=args.command == "api")
        except ValueError as refused:  # WeakSecret, or a malformed LEADSTREAM_API_KEYS
            print(f"leadstream {args.command}: {refused}", file=sys.stderr)
            return 2

    if args.command == "stack":
        from leadstream.stack import main_stack

        return main_stack(args.action, settings, args.cluster)
    if args.command == "migrate":
        return _migrate(settings)
    if args.command == "retention":
        return _retention(settings)
    if args.command == "worker":
        from processors.app import PROCESSORS, run_worker

        processors = tuple(p.strip() for p in args.processors.split(",") if p.strip()) or PROCESSORS
        unknown = sorted(set(processors) - set(PROCESSORS))
        if unknown:
            parser.error(f"unknown processor(s) {', '.join(unknown)}; known: {', '.join(PROCESSORS)}")
        sys.argv = [sys.argv[0]]  # Faust's Worker parses argv itself
        run_worker(settings, args.name, args.loglevel, processors, _clickhouse_query(settings))
        return 0
    if args.command == "sink":
        from sinks.table_sink import TABLES

        tables = [t.strip() for t in args.tables.split(",") if t.strip()] or list(TABLES)
        unknown = sorted(set(tables) - set(TABLES))
        if unknown:
            parser.error(f"unknown table(s) {', '.join(unknown)}; known: {', '.join(TABLES)}")
        return _run_sink(settings, tables)
    if args.command == "ip-ranges":
        from leadstream.admin import load_ip_ranges

        return load_ip_ranges(settings, args.path)
    if args.command == "companies":
        from leadstream.admin import load_companies

        return load_companies(settings, args.path)
    if args.command == "account":
        from leadstream.admin import add_account

        return add_account(settings, args.site, args.domain, args.name)
    if args.command in ("rules", "segments", "boards", "owners"):
        from leadstream.admin import apply_definitions, list_definitions, rebuild_boards

        if args.action == "rebuild":
            return rebuild_boards(settings)
        if not args.site:
            parser.error(f"{args.command} {args.action} needs --site")
        if args.action == "list":
            return list_definitions(settings, args.site, args.command)
        if not args.path:
            parser.error(f"{args.command} apply needs a FILE")
        return apply_definitions(settings, args.path, args.site, args.command)
    if args.command == "webhooks":
        from leadstream.admin import replay_webhook

        return replay_webhook(settings, args.webhook_id)
    if args.command == "erase":
        from leadstream.admin import erase_person

        if not (args.status or args.email or args.lead):
            parser.error("erase needs --email, --lead or --status")
        return erase_person(settings, args.site, args.email, args.lead, args.wait, args.status)
    if args.command == "export-person":
        from leadstream.admin import export_person

        return export_person(settings, args.site, args.email)
    if args.command == "api":
        from api.app import run_api

        run_api(settings)
        return 0
    if args.command == "demo":
        from leadstream.demo import run_demo

        return run_demo(settings, visitors=args.visitors, seed=args.seed)
    if args.command == "bench":
        from leadstream.bench import run_bench

        return run_bench(settings, events=args.events, open_sessions=args.open_sessions, workers=args.workers,
                         layout=args.layout)
    if args.command == "bench-profile":
        from leadstream.bench_profile import run_profile_bench

        return run_profile_bench(settings, events=args.events)
    return 2


if __name__ == "__main__":
    sys.exit(main())
