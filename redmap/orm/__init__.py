"""The ORM: mapping and instance state, the session, the unit of work and the flush
(planning, the flush protocol). Import public names from `redmap`; nothing is
imported here, so that the drivers can import the flush protocol alone."""
