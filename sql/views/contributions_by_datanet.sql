-- Contributions per datanet and contributor, and how many of them a review approved.
SELECT
  c.datanet_id,
  c.contributor,
  count(DISTINCT c.contribution_id) AS contributions,
  count(DISTINCT r.contribution_id) FILTER (WHERE r.verdict = 'approved') AS approved,
  min(c.event_time) AS first_contribution,
  max(c.event_time) AS last_contribution
FROM contribution_submitted c
LEFT JOIN contribution_reviewed r ON r.contribution_id = c.contribution_id
GROUP BY c.datanet_id, c.contributor
