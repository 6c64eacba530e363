"""Routers: one APIRouter per resource under /api/ (users, projects, tasks, labels) and the HTML pages (ui)."""
