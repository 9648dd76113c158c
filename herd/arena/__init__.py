"""herd arena: battles between models with an honest public record (see herd.arena.service)."""
