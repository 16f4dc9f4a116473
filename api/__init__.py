"""LeadStream api."""
