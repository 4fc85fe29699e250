"""Finance: memberships' payments booked in an accounting system (Xero), and the
reconciliation of the payment provider, the accounting system and memberhub's ledger."""
