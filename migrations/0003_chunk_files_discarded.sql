-- Delivered audio leaves the disk as soon as Roark has the whole call (unless the drainer
-- keeps it): the chunk row stays for retention, and this says its file is gone on purpose.
ALTER TABLE chunks ADD COLUMN discarded_at INTEGER;
