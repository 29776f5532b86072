-- A device's class in a column of its own: an order names and targets
-- devices by id and class, and reading only those two is what keeps an
-- order to a fleet of 100,000 from first decoding 100,000 records.
ALTER TABLE devices ADD COLUMN class text;
UPDATE devices SET class = convert_from(data, 'UTF8')::jsonb->>'class';
ALTER TABLE devices ALTER COLUMN class SET NOT NULL;
