-- Where each event's IP is and what network it is in (processors/networks.py): looked up at enrichment
-- from the geo data package and the operator's IP-range table. Rows stored before this migration have
-- '' and 0: their location was never looked up.
ALTER TABLE events ADD COLUMN geo_country String DEFAULT '' AFTER lead_id;
ALTER TABLE events ADD COLUMN geo_region String DEFAULT '' AFTER geo_country;
ALTER TABLE events ADD COLUMN geo_city String DEFAULT '' AFTER geo_region;
ALTER TABLE events ADD COLUMN network_asn UInt32 DEFAULT 0 AFTER geo_city;
ALTER TABLE events ADD COLUMN network_org String DEFAULT '' AFTER network_asn;
ALTER TABLE events ADD COLUMN network_kind String DEFAULT '' AFTER network_org;
ALTER TABLE events ADD COLUMN network_domain String DEFAULT '' AFTER network_kind;
