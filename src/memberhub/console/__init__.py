"""The staff console: server-rendered pages under /console.

Each page is a module in `pages/` with its own router; `install_console` adds them to the
application. A page asks for the signed-in staff user with `SignedInStaff` (a dependency
that gives the user and the `Principal` they act as), calls the service layer as an API
route would, and renders a template extending `base.html`. Forms post with the session's
CSRF token (`{{ csrf_field() }}`); a form posted without it is refused before the page runs.
"""
