"""Staff accounts: the people who sign in to the console, by password (with an optional
TOTP second factor) or by OpenID Connect single sign-on."""
