-- Hand-over to sales: a board's stage.changed webhooks share the delivery log with rules' webhooks; board_id
-- names the board ('' for a rule's webhook, whose rule_id is set). A lead change made by a person (a tag by
-- hand through the API) records who: actor is "user:<key id>" ('' for rules and the system).
ALTER TABLE webhook_deliveries ADD COLUMN board_id String;
ALTER TABLE lead_changes ADD COLUMN actor String;
