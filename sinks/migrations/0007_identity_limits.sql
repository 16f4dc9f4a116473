-- A lead record lists at most `lead_max_visitors` of its visitors (1,000 by default) so that a lead with
-- thousands of (possibly forged) visitor ids keeps a bounded row; `visitor_count` counts all of them, and
-- the list is complete exactly when visitor_count = length(visitors). Every visitor of a lead is still in
-- `visitor_leads`. Rows written before the cap listed all their visitors: the default counts them.
ALTER TABLE leads ADD COLUMN visitor_count UInt32 DEFAULT length(visitors) AFTER created_event_id;
