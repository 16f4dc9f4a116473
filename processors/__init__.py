"""LeadStream processors."""
