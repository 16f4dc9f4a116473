"""LeadStream leadstream."""
