-- Company cards by account domain (schemas/companies.py): loaded from files with `leadstream companies
-- load` or filled in by an enrichment provider, written here through the `companies` topic. A card that
-- changed is a new row; the newest (updated_ms) wins: read with FINAL or argMax(column, updated_ms).
CREATE TABLE IF NOT EXISTS companies (
    domain String,
    name String,
    industry String,
    employees String,
    employees_min UInt32,
    country String,
    website String,
    linkedin_url String,
    logo_url String,
    source String,
    updated_ms UInt64
) ENGINE = ReplacingMergeTree(updated_ms)
ORDER BY domain;
