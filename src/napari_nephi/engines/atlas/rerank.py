"""Second stage of the plate lookup: re-rank the embedding's shortlist by a pose search in the atlas.

The embedding ranks plates fast but sees scale (partial sections are cropped to their tissue),
obliqueness and a foreign stain poorly. Here the section is compared with the atlas itself:

* **Pose.** For a 3D reference (``Plates.volume``): the atlas position ``z``, a tilt (pitch and yaw
  within ``max_tilt`` degrees), an in-plane rotation (within ``max_rotation``), a scale and a
  shift; oblique cuts of the reference come from :func:`scipy.ndimage.map_coordinates` on an
  in-plane downsampled copy (voxels taken as cubes). For a list of 2D plates: plate, rotation,
  scale, shift. The section is never cropped to its tissue box in a way that changes its scale:
  the scale is searched from the ratio of tissue extents (the larger of the two axes, which a cut
  rarely shortens) to :data:`MAX_SCALE_FACTOR` times it, so half a section is matched to half a
  plate.
* **Similarity.** Normalised gradient fields compared by the squared cosine of edge directions on
  the section's tissue, all shifts at once by FFT (:mod:`.pose_grid`): invariant to inverted or
  remapped contrast (fluorescence against Nissl). ``edge_blur`` (1.2 grid pixels; 0 before session
  16): the field is the mean of the plain field and that of a copy blurred by that much, so region
  boundaries count more against cell texture and noise. Session 16: the sections ranked far off were
  outscored, not missed (30 of the 33 ranked > 5 on query seeds 7-12 stay there with a stage-2
  hypothesis forced at the true plate; 18 of them fluorescence with weak inner edges). The comparison
  runs at the section's own resolution (its tissue ``coarse_size`` / ``work_size`` pixels long; the
  atlas cuts are resampled to it), so a small plate gains nothing from a whole section shrunk onto it.
* **Search.** Stage 1, on a coarse grid (``coarse_size``): untilted plates of the shortlist (the
  embedding's ``shortlist`` best plates and ``neighbours`` on each side, and every
  ``sweep_step``-th plate of the atlas, for sections the embedding misplaces) x rotations x scales.
  Stage 2, on the finer grid (``work_size``), for the ``hypotheses`` best poses at least
  ``hypothesis_gap`` plates apart (:func:`hypotheses`), plus the best stage-1 pose on each of the
  first stage's ``anchors`` best plates that no hypothesis is near (a strongly tilted section scores badly on
  untilted plates, so stage 1 alone drops the right region): nearby plates, rotations and scales;
  for a volume then tilts of a cut turned about the section's tissue centre, every pitch x yaw of
  the ``tilt_step`` grid together (``tilt_search`` "joint"; "sequential" searches pitch, then yaw,
  which misses sections tilted about both axes), then a half-step grid around the best, and
  rotation and scale again. Optional: ``region_refine`` best poses moved to a maximum of the
  correlation ratio of the section given the atlas's regions (:mod:`.region_fit`; measured worse
  on the phantom, off), ``prior_weight`` (score lost in proportion to the first stage's distance,
  0 at its best plate, the weight at its median distance and beyond; 0.02 since session 16, 0 before;
  with ``prior_margin``, session 38, opt-in, ``prior_margin_weight`` instead where the first stage
  places the section clearly, :func:`first_stage_margin`),
  ``tilt_margin`` (tilts searched only around hypotheses whose untilted best lies within the margin
  of the best one; session 14, query seeds 0 / 1: 0.1 kept all 120 rankings but cut only 10 % of the
  tilted cuts and ~3 % of the CPU, 0 cut 74 % and ~32 % but ranked 2.80 against 2.32; off).
  Then the ``z_scan_poses`` best distinct stage-2 poses are each cut again at every plate within
  ``z_scan`` of theirs, at their own tilt, rotation and scale through the same atlas point (shift
  searched nearby): the tilt search runs at a hypothesis's plate only (the finer grid also one
  plate either side), so a plate a few away was compared untilted alone. Session 15 (session 13's
  index; 2 poses, 6 plates, ~24 cuts, 10-30 ms CPU, ~5 %): mean rank 1.62 / 2.93 / 2.27 / 2.17 -> 1.53 /
  2.55 / 2.22 / 1.97 on query seeds 0 / 1 / 5 / 6 (2.25 -> 2.07 over the 240 sections, Top-1/5
  38.8 / 88.8 -> 43.3 / 89.6 %), 1.75 / 1.73 -> 1.52 / 1.63 on seeds 2 / 3. Over the 240 / the 120
  of seeds 2 and 3: one pose, 6 plates 2.15 / 1.58 (3 plates 2.18 / 1.60, 9 plates 2.16 / 1.54);
  3 poses 2.06 / 1.58. On six fresh query seeds (7-12, 360 sections) it ties: 3.35 -> 3.33, for
  about 10 % more CPU. Measured on the phantom alone.
* **Outside band** (session 21, ``outside_weight`` 0.3; 0 before). A pose's score is multiplied by
  ``1 - outside_weight * share``, ``share`` the part of a band just outside the section's tissue
  (:data:`.pose_grid.OUTSIDE_RING` of its extent wide, tears and holes closed) that lies on the atlas's
  tissue: the similarity counts only the section's tissue, so a small plate enlarged under a whole
  section (its tissue going on around the section) cost nothing; 4 of the 6 development similarity
  misses of session 20 were that. A cut edge of a partial section has atlas tissue beyond it too,
  so partial sections can lose. Both stages, a fourth correlation per pair (~17 % more CPU). 1,500
  sections (development and query seeds 45-47 / 53-58), with ``penalty_reach`` 6: mean rank 1.955 ->
  1.708, Top-1/3/5/10 46.2 / 83.0 / 91.9 / 96.4 -> 46.7 / 85.5 / 93.9 / 97.5 % (319 better, 284 worse;
  with both defaults against session 20: 2.147 -> 1.616; docs/atlas.md, "The band outside the section").
  Options of session 22 (docs/atlas.md, "Cut edges and the plate next to the best pose"):
  ``spare_cuts`` spares the band beyond straight runs of the section's outline (at least
  :data:`.pose_grid.CUT_RUN` of its extent; a knife cut or the edge of a partial section) and, where
  the tissue reaches the image's edge, beyond the image; ``outside_free`` lets that share of the band
  on atlas tissue cost nothing (the cost grows to ``outside_weight`` at a share of 1);
  ``plain_reach`` orders the plates within that many of the best pose by the similarity without
  the band (:attr:`.pose_grid.Pose.plain`): the band picks the region, the similarity the plate.
* **Tilt rounds** (session 23, ``tilt_rounds`` 2; 1 before). The tilt grid of a hypothesis runs at
  the rotation and scale of its untilted best, which an oblique cut biases (the untilted plate is
  turned and scaled to fit it); the rotation-and-scale step after the grid then moves them, but the
  tilt was not searched again. Now, where that step moved the rotation or scale, the finer (half-step)
  tilt grid runs again at the new ones, then rotation and scale again. Of the Top-5 misses of session
  22's defaults (1,860 sections), 28 of 109 score higher at their true pose than at the pose ranked
  first (search misses; the other 81 score lower: no search ranks them better); of the 23 of those
  with a pose within 1 plate of the truth, 13 had its rotation 5 degrees or more, or its scale 10 % or
  more, off the generator's. The 1,860: mean rank 1.571 -> 1.522, Top-1 47.2 -> 48.7 %, Top-5 94.1 ->
  94.3 % (worse on 5 of 31 seeds), CPU median +3 %. ``rerank.SEEDED`` and ``rerank.FAST`` keep one
  round (their CPU was measured so). docs/atlas.md, "Top-5 misses and tilt rounds, session 23".
* **Hypotheses apart** (session 25, ``hypothesis_gap`` 3, as :data:`HYPOTHESIS_GAP` before). With 3,
  two of the four starts often lie in one region (plates 94 and 91 both refine 92-93). Of session 24's
  21 search misses, 6 had no start near the truth (stage 1's distinct poses near it ranked 5th-11th,
  0.03-0.08 below the best on a flat run of weak scores, or none), 2 of them because two starts shared
  a region. Gaps 4 / 5 (the starts' untilted
  steps disjoint from 5) reach 3 / 2 of the 21 at the same CPU but rank worse on every seed measured
  (360 sections of query seeds 0 / 45 / 62-64 / 80: mean rank 1.539 -> 1.625 / 1.667, Top-1 51.1 ->
  48.3 / 47.8 %): a second start in the leading region finds its plate and pose better than a start in
  another region finds the truth. Gap 2 (more starts in one region) loses too (all 2,220 sections:
  1.519 -> 1.580, Top-5 94.3 -> 94.1 %, worse on 22 of 37 seeds). Opt-in; docs/atlas.md, "The search
  misses, session 25".
  Only the choice of the starts among stage 1's poses (and of the widening's new starts) follows it: an
  anchor is added where no start lies within :data:`HYPOTHESIS_GAP` (3) of its plate, and the widening's
  new starts lie 3 from the first pass's, whatever the option (the numbers above are for that).
* **Information** (session 24, opt-in: ``information_weight`` 0, ``information_margin`` 0.05).
  Each plate whose best pose lies within the margin of the best pose (score less prior) gains the
  weight times the mutual information of the section's and the atlas's intensities at that pose
  (:meth:`.pose_grid.SectionGrid.information`, both smoothed by 1 grid pixel, 16 x 16 bins) over the
  least such plate's; ``plain`` is left alone. Why: of the 106 Top-5 misses of session 23's defaults
  on C's 1,860 sections, 85 score lower at their true pose than at the pose ranked first, and there
  it is the edge field's correlation itself (its numerator lower at the truth in 84 of 85), not the
  tissue share, the outside band or the field-energy normalisation; at the same two poses the mutual
  information ranks the truth first in 41 of the 85 (edge variants: at most 12). In the search (one
  pose per plate, 1,860 sections + fresh query seeds 74-76) weight 0.3: mean rank 1.512 -> 1.500,
  Top-1 48.4 -> 49.2 %, Top-5 94.3 -> 94.2 % (+22 / -25), straight sections 0.689 -> 0.767, fresh
  seeds 74-76 1.422 -> 1.472 (Top-5 94.4 -> 92.8 %): not a default (docs/atlas.md, "The similarity on
  the misses, session 24"). About 10 measured poses, a few ms of CPU per lookup.
* **Regions** (session 35, opt-in: ``region_weight`` 0, ``region_margin`` 0.03, ``region_refit``
  True; measured at ``{"region_weight": 0.1}``; :data:`SEEDED` and :data:`FAST` keep it off). As the
  information term, with the adjusted correlation ratio of the section's tissue intensities given
  the atlas's regions under them (:func:`.region_fit.region_ratio`; with ``region_refit`` at the
  pose first moved to a local maximum of the ratio, its plate position fixed,
  :func:`.region_fit.refine` at :data:`REGION_FIT_SIZE` / :data:`REGION_HALVINGS` /
  :data:`REGION_MOVES`): how much of the section's variance the atlas's regions explain, whatever
  level the stain gives each region. It assumes the stain is even within each annotated region, at
  the annotation's granularity; it needs an annotation (without one it does nothing). Only the
  plates within the margin of the best pose move (by 0.001-0.004 of score typically). Of 63 far
  misses (rank 5 or beyond) on 960 development sections, the refitted ratio is higher at the
  truth's pose than at the winner's in 38 (the edge score in 22, mutual information in 23).
  Weight 0.1: 480 development sections 1.810 -> 1.733 (replayed; 25 better / 11 worse, Top-5 the
  same), 480 more 1.496 -> 1.427; query seeds 140-142 (180 sections, alternating per section):
  1.800 -> 1.717, Top-1 / 5 74 / 169 -> 75 / 169 sections, 8 better / 2 worse, two far misses
  carrying the gain; CPU per lookup +5.7 %. Not a default (review 1 of session 35): the phantom's
  stain draws one level per annotation label, so the ratio is the generator's own model, and with
  adjacent labels merged in pairs half the gain goes (docs/atlas.md, "Session 35").
* **Quarters** (session 40, opt-in: ``quarter_shift`` 0, ``quarter_margin`` 0.05, ``quarter_reach`` 4;
  volumes only: on a list of 2D plates nothing moves, :attr:`.pose_grid.Pose.shifted` stays None and
  :attr:`RerankResult.quarter_moved` is 0, the count of poses moved). The
  best pose of each plate within the margin of the best pose (score less prior) is cut again at
  ``z + dz`` for every ``dz`` within the reach (its tilt, rotation, scale, aspect and atlas point
  kept), each quarter of the section's tissue (split at its tissue centre) takes the ``dz`` that scores
  best by the edge field on it alone (:meth:`.pose_grid.SectionGrid.quarter_offsets`), and the pose
  moves along the plate axis by ``quarter_shift`` times their tissue-weighted mean. The moved pose
  keeps the score of its cut before the move (it is not scored again at its new plate), so
  ``search_poses(...).poses`` may hold, for a plate, a pose whose score was measured a plate or two
  away. The idea (development only): a section of another (warped) brain is not flat in the atlas (on
  development query seeds 5-8 the far misses' tissue spans a median 9 plates against 5 for the hits),
  and one plane's best plate follows the parts whose edges fit best. The fresh reading does not
  support it where it was aimed: query seeds 159 / 160 at 0.5 (rule written first; read with 91ab02d's
  ``quarter_offsets``, before the tie rule of fa215d6: 12 sections of seed 159 read again after it give the
  same top-10), today's stain
  1.375 -> 1.300 / 1.275 -> 1.217 on the training-seed-0 / 1 indexes, gains on straight, oblique
  (1.667 -> 1.333 / 1.583 -> 1.208) and partial sections but losses on the fluorescence-like contrast
  (+0.083 / +0.083) and combined (+0.083 / +0.167) ones, and ``foreign`` 3.167 -> 3.200 (Top-5 101 ->
  99) on index 0: it failed the rule (index 1's combined case, index 0's ``foreign``) and is not a
  default. About 9 more cuts per plate moved (~5 plates), CPU +7-10 % per lookup. docs/atlas.md,
  "Session 40".
  **Stain gate** (session 41, opt-in: ``quarter_gate`` None). The re-estimate gained on Nissl-like
  sections and lost on fluorescence-like ones, so with ``quarter_gate`` it acts only on sections whose
  stain reads like the atlas's: ``"polarity"``, where the section's background is bright or dark as the
  atlas's plates' are (:attr:`.pose_grid.AtlasGrid.bright`; a section imaged as the atlas was); a number,
  where the correlation of the section's intensities with the atlas's at the best pose (score less
  prior), each in its own polarity (:meth:`.pose_grid.SectionGrid.level_correlation`), lies above it.
  The reading is one cut at one pose; :attr:`RerankResult.quarter_reading` and ``quarter_open`` say what
  it read and whether the gate opened. On the phantom the fluorescence-like stain always has the
  opposite background, so ``"polarity"`` is the generator's own switch there (development query seeds
  159 / 160, both indexes: 91 / 91 Nissl-like sections open, 29 / 29 fluorescence-like shut, each stain),
  and a reading of it on the phantom is that of a perfect stain reader, not evidence for the polarity on
  real stains; the correlation's sign separates today's stain nearly as well (index 0: Nissl-like 0.058
  to 0.891, fluorescence-like -0.798 to -0.253; index 1: one Nissl-like section at -0.119) but not
  ``marker``'s (12 / 10 of its 29 fluorescence-like sections above 0, index 0 / 1). A real section
  stained like the atlas but imaged the other way (fluorescent Nissl against a brightfield atlas) shuts
  ``"polarity"``'s gate, and a brightfield stain unlike the atlas's (DAB) passes it. Fresh query seeds
  161 / 162 (rule written first), ``{"quarter_shift": 0.5, "quarter_gate": "polarity"}`` against the
  defaults: today's stain 1.717 -> 1.700 / 2.133 -> 2.117 (index 0 / 1), no fluorescence-like section
  changed, ``foreign`` on index 0 Top-5 100 -> 99 (one Nissl-like combined section, 4 -> 7): it failed the
  rule and is not a default. docs/atlas.md, "Session 41".
* **Aspect** (session 26, opt-in: ``aspects`` empty, ``aspect_margin`` 0.05). The best pose of each
  plate within the margin of the best pose (score less prior) is cut again at each ratio of
  ``aspects`` (the cut's plate pixels per section pixel along its rows over those along its
  columns, their geometric mean kept; :attr:`.pose_grid.Pose.aspect`), at its tilt, rotation, scale
  and atlas point, the shift searched nearby; the new poses join the others. Why: a specimen is
  rarely the atlas's shape (the benchmark's are stretched by up to 4.5 % per axis), and a rigid,
  isotropically scaled cut of the true plate can lose to a neighbour whose outline fits the stretch.
  docs/atlas.md, "The similarity misses by case, session 26". ``aspect_max_tilt`` (session 27; None:
  every pose) leaves out poses tilted by more than that many degrees (a tilt about one axis also
  shortens the cut along the other, so tilt and aspect trade off).
* **Widening** (session 20, opt-in). ``widen_score``: where no pose of the search scores above it,
  a second pass scores stage 1 on every plate it skipped and refines the ``hypotheses`` best
  distinct stage-1 poses away from the first pass's hypotheses (tilts, scan along the plate axis).
  Its poses are kept only when one of them ranks first (score less prior above the first pass's
  best). ``widen_gap`` also widens where the best pose lies more than that many plates from every
  shortlisted plate. Of the 960 development sections, 8 had no pose within 2 plates of the truth
  (0.62 of the mean rank 2.122); at the true tilt, rotation and scale, 6 of them score below the
  wrong winner (similarity misses: no search finds them) and 2 above (search misses). ``widen_score``
  0.3: development 2.122 -> 1.993 (7 better, 4 worse), but on seeds held out after the choice
  (48-50, the lead's, and 53-55; 360 sections) 2 better and 2 worse, mean about 1.902 -> 1.932 (seed
  49: one pick moved ~77 plates). The acceptance compares a maximum over ~130 plates with one over the
  first pass's 12-40, where every score is weak: a maximum over more noise wins by selection alone,
  and nothing bounds where the accepted pose lies. So it stays off until a bounded rule is shown on
  held-out seeds (docs/atlas.md, "Widening the search where it failed, session 20").
* **Denser sweep where the shortlist was outscored** (session 29, opt-in: ``dense_sweep`` 0,
  ``dense_outside`` 2, ``dense_mode`` "add", ``dense_starts`` 2). With ``dense_sweep`` (e.g. 3), where
  at least ``dense_outside`` of stage 2's starts (chosen from stage 1 as usual) lie outside the
  shortlisted plates (the embedding's ``shortlist`` best and ``neighbours`` each side), the sweep
  found plates as good as the embedding's, so the embedding may have missed the region, and a truth
  2-3 plates from every plate of the sweep gets no start (session 28's far misses): stage 1 also
  scores every ``dense_sweep``-th plate (the plates already scored are not scored again). "add" keeps
  the starts and adds up to ``dense_starts`` new ones on the new plates, ``hypothesis_gap`` apart from
  each other and from every start stage 1 scored at least as well; "replace" chooses every start again
  from the denser stage 1, as ``sweep_step`` ``dense_sweep`` would (the first sweep's other plates are
  then left out). Elsewhere nothing changes. Why "add": the dense plates lie 3 apart, exactly
  ``hypothesis_gap``, so with "replace" one region takes most of the starts and the default's start at
  the truth is dropped. Phantom benchmark (docs/atlas.md, "A bounded denser sweep, session 29"; 1,440
  development sections, replayed): mean rank 1.916 -> 1.797 ("replace" 1.986, ``sweep_step`` 3 1.953)
  for about 5 % more CPU, firing on 10 % of the sections; fresh query seeds 104-106 1.978 -> 1.978, Top-5
  93.3 -> 92.8 % ("replace" 2.083, ``sweep_step`` 3 2.139): not a default.
* **Refining the sweep's best plates** (session 34, ``sweep_refine`` 4, ``sweep_outside`` 2; 0 / 0 before).
  With ``sweep_refine`` (e.g. 4) stage 1 also scores the neighbours (``neighbours`` each side) of that
  many best swept plates outside the shortlisted plates, as if they were shortlisted, and stage 2's
  starts are chosen again; with ``sweep_outside`` only where at least that many of the starts already
  lie outside the shortlisted plates (:func:`_refined`, :func:`_refine_sweep`). Why: a region the
  embedding misses is sampled every ``sweep_step``-th plate against the shortlist's every plate, so a
  wrong shortlisted region takes every start (session 34: the two far losses of the 7000-step index on
  query seed 131, the truth at place 24-27 of its order). Development (query seeds 0, 1, 128-131,
  360 sections, default index / 7000-step index): 4 everywhere 1.525 -> 1.522 (Top-5 94.2 -> 93.6 %,
  6 better, 12 worse) / 1.700 -> 1.547; with ``sweep_outside`` 2 (fires on 34 / 24 of 360) 1.525 ->
  1.478 (Top-5 the same, 4 / 5) / 1.700 -> 1.611 (4 / 2). Fresh query seeds 134-136 (rule written
  first; the defaults and the option alternating per section): 1.428 -> 1.411, Top-1/5 51.1 / 93.9 ->
  52.2 / 94.4 %, 2 better / 2 worse, fired on 19 of 180, CPU +2.3 % / 1.428 -> 1.383, Top-5 94.4 ->
  95.0 %, 1 / 0; 600 more development sections (query seeds 5-8, 113-118) 1.863 -> 1.798, 9 / 7. The
  gains are a few sections per set (mostly one far rescue); with ``sweep_outside`` 2 the gate does not
  fire on the two losses above (0 and 1 start outside), which refining everywhere (1x 6 better / 12
  worse) would be needed for one of. The presets :data:`SEEDED` (no sweep) and :data:`FAST` leave it
  off. docs/atlas.md, "Session 34".
* **Two-pass stage 1** (session 30, ``stage1_prune`` 0.05; None: one pass, every pair, as before; the
  presets keep one pass). Stage 1 scores
  every plate's pairs at rotation 0 first; then the other rotations of the anchors' plates and of the
  ``hypotheses`` best plates by their rotation-0 best, and, ``hypotheses`` plates at a time in that
  order, of every plate whose rotation-0 best lies within ``stage1_prune`` of the weakest of the
  ``hypotheses`` distinct starts chosen from the plates scored in full so far (:func:`_pruned_stage1`).
  A plate left out keeps its rotation-0 best, below every start. Stage 2 depends on its starts alone,
  and they are those of the full stage 1 wherever no plate left out would have scored in full above
  the weakest start (a plate's best over every rotation was a median 0.014 above its rotation-0 best
  on query seed 0, 90 % within 0.068). 0.05: on 360 development sections (query seeds 0, 1, 5-8) the
  starts are the same on 305, stage 1 scores 56 % of its pairs, and the ranks are 1.950 -> 1.956, Top-1
  44.7 -> 45.3 %, Top-5 92.2 -> 91.9 % (2 better, 2 worse); on the 180 fresh sections of query seeds
  110-112 (read after the choice) the starts are the same on 151, 1.761 -> 1.739, Top-5 92.2 -> 92.8 %
  (3 better, 0 worse); CPU per lookup 15 % less (the defaults and the option alternating per
  section); docs/atlas.md, "Session 30". Only the first pass of stage 1 is pruned (the
  ``dense_sweep`` plates and the widening's are scored in full).
* **Tilt climb** (session 31, opt-in: ``tilt_climb`` False). The joint pitch x yaw grid (24 oblique cuts
  per hypothesis, ~100 per lookup of ~250) is climbed from the untilted best instead of cut whole: the
  8 tilts one ``tilt_step`` around the best pose so far, until none is better (:meth:`_Refine._climb`;
  about 11 cuts instead of 24). Offline on the captured grids of 300 development sections (query seeds
  0, 1, 5-7) it ends at the whole grid's best tilt on 91 % of the grids; where not (a second peak
  beyond a dip, mostly combined and partial sections), the rest of the search differs. Searched with
  the defaults alternating per section (query seeds 0 / 1 / 5, 180 sections, load 13-17): CPU -6.6 /
  -7.8 / -9.0 %, mean rank 1.883 -> 2.033 (1 section better, 6 worse; worse on each seed): not a
  default (docs/atlas.md, "Session 31").
* **Finer grid near the best** (session 31, ``finer_margin`` 0.08; None before). A pose counts in the
  ranking only within ``plate_penalty`` x ``penalty_reach`` (0.04) of the best pose (or next to it);
  a hypothesis whose best after the joint tilt grid lies more than ``finer_margin`` below the best pose so far
  (every untilted best and the earlier hypotheses' searches) gets no finer grid, rotation and scale or
  second round: its finer grid raised it by a median 0.012 (99 % within 0.11) on 248 hypotheses of
  query seed 0. 0.08 was the smallest margin whose replay on the captured searches of 360
  development sections (query seeds 0, 1, 5-8) changed no ranking (0.06 changed 2 of 249); it leaves
  out 8 % of stage 2's pairs (the finer grid's oblique cuts). docs/atlas.md, "Session 31".
* **Untilted step in two passes** (session 31, ``untilted_prune`` 0.05; None before). Stage 2's untilted step
  scores each plate cut (5 plates x 3 scales per hypothesis) at the hypothesis's rotation first, the
  rotations either side only on the cuts within ``untilted_prune`` of the best of those: the cuts
  are the same, about 30 % of their correlations are left out. Replayed on the same 360
  sections, 0.05 kept every hypothesis's untilted best (so the tilt search is the same) and every
  ranking, for 11.5 % of stage 2's pairs. Both defaults searched against the previous ones,
  alternating per section (load 14-18): 180 development sections (query seeds 0 / 1: each alone;
  7: both), every ranking identical, CPU -0.5 to -9.8 %; fresh query seeds 116-118 (every 2nd section,
  read after the choice): 89 of 90 rankings identical (the 90th better: a straight section's truth
  2nd -> 1st), mean rank 2.556 -> 2.544, CPU 486 -> 442 ms per lookup (-9 %). docs/atlas.md, "Session 31".
* **Routing** (session 32, opt-in: ``route_gap`` None, ``route_agree`` None). Where stage 1 places the
  section clearly, stage 2 refines its best start alone (no other start, no anchor, one pose scanned
  along the plate axis; :func:`_route`): its best start scores at least ``route_gap`` above every
  stage-1 pose more than :data:`ROUTE_REACH` (3) plates from it, and with ``route_agree`` its plate lies
  within that many plates of the first stage's best. Stage 1 is the same; a routed lookup costs about
  0.19 s of CPU against 0.32 s. Development (720 sections of query seeds 0, 1, 5-8, 113-118, the
  defaults alternating per section): at 0.05, 37 % routed (96 % of them with stage 1's best start
  within 2 plates of the truth), mean rank 1.829 -> 1.812, Top-5 92.6 -> 92.9 %, 24 better / 18
  worse, CPU per lookup -15 %; below 0.05 sections placed 4-13 plates off get through (0.04: 113
  oblique 8 ranks 1 -> 20). Fresh query seeds 122-124 (180 sections, the rule written first): 2.650 ->
  2.644, Top-5 88.3 -> 87.8 %, 5 better / 5 worse, CPU -15.5 %, but seed 122 3.117 -> 3.233, over the
  pre-written limit of 0.10 for one seed: not a default. docs/atlas.md, "Session 32".
* **Scales near the rotation-0 best** (session 43, opt-in ``stage1_scale_reach``: None, every scale,
  the default). Stage 1's second pass (the other rotations of the plates the two-pass stage 1 keeps,
  and of the refined sweep's) scores each plate only at the scales within that many ``scale_step``
  steps of its rotation-0 best pose's scale (half a step of slack for the scale grid's rounding,
  :func:`_near_scales`). Why: the scale says how large the section's anatomy is against the plate's,
  and an in-plane turn of at most ``max_rotation`` does not change that; each plate's scales span
  about 1.9x (7 steps of 1.1), so at 1 the second pass scores 3 of them. At 1: stage-1 pairs about
  720 -> 440, CPU per lookup 11-12 % less; today's stain unchanged within its rule on fresh query seeds
  165 / 166 and the lead's held-out 167 / 168 (both indexes), but on the ``marker`` stain a
  fluorescence-like section's rotation-0 best scale can be wrong, and the lead's off-label held-out
  condition failed on one index (7.467 -> 7.600, margin 0.10): opt-in. docs/atlas.md, "Session 43".
  Session 44's ``stage1_scale_margin`` (0.04) also keeps every scale whose rotation-0 pose scores within
  it of the plate's rotation-0 best; fresh query seeds 173 / 174 (session 45, rule first, both indexes,
  three stains): rankings the defaults' on 716 of 720 sections, mean rank within +0.008, Top-5 never
  lower, CPU per section 0.876-0.904; opt-in until the lead's held-out reading. docs/atlas.md, "Session 45".
* **Shared joint grid** (session 44, ``tilt_share`` 1; None before). A hypothesis whose untilted best
  lies within ``tilt_share`` plates of a better hypothesis's untilted best cuts no joint pitch x yaw grid
  of its own (24 oblique cuts): its finer grid, at its own plate, atlas point, rotation and scale, is
  centred on the tilt that better one's joint grid found (neighbouring plates of one region share the
  cut's tilt); ``RerankResult.tilts_shared`` counts them. Where the grid is not cut whole
  (``tilt_climb``, ``tilt_search`` "sequential") the default steps aside (None); given with them it is
  an error. Development (query seeds 167 / 168, 120 sections per index): mean rank 3.608 -> 3.567 /
  3.950 -> 3.933, CPU per section 0.954 / 0.952 (3 plates: 0.920 but oblique sections lose). Fresh query
  seeds 169 / 170 (rule first, both indexes, three stains): today's stain 2.925 -> 2.925 / 2.183 ->
  2.183, CPU 0.963 / 0.970, foreign and marker within +0.042. The lead's held-out query seeds 171 / 172
  (both indexes; today's, foreign, marker): 1.200 -> 1.208 / 1.250 -> 1.233 (CPU 0.946 / 0.950), 3.500
  -> 3.408 / 4.050 -> 4.100, 5.675 -> 5.692 / 5.067 -> 5.025, Top-5 never lower, every
  mark passed: the default since then, a saving of 3-5 %. docs/atlas.md, "Session 44".
* **Follower's offsets** (session 45, opt-in ``share_finer_reach``: None, a ``tilt_share`` follower's
  finer grid at :data:`FINE_DZ`, one plate each side, as session 44). At 0 a follower's first finer
  grid is cut at its own plate only (9 tilts instead of 9 x 3): its leader's finer grid, within
  ``tilt_share`` plates, already searched the plates around it at nearly the same tilts. Its second
  round is as before. An error where ``tilt_share`` is None. docs/atlas.md, "Session 45".
* **Untilted reach** (session 45, opt-in ``untilted_reach``: None, :data:`REFINE_PLATES` (2) plates each
  side of a hypothesis in stage 2's untilted step, as before). At 1 the step cuts 3 plates x 3 scales
  per hypothesis instead of 5 x 3; the tilt search and the scan along the plate axis (``z_scan``)
  still reach the plates farther off. docs/atlas.md, "Session 45".
* **Untilted scales** (session 45, opt-in ``untilted_scale_prune``: None, every scale). The untilted
  step's first pass (at the hypothesis's rotation) cuts each plate at the hypothesis's scale first and
  the scales either side only on the plates scoring within ``untilted_scale_prune`` of the best of those;
  ``untilted_prune``'s rotation pass then runs on every cut made (an error without ``untilted_prune``).
  A plate whose cut at that scale overlaps the section too little for any shift (scored -2) is pruned
  at any margin. With ``share_finer_reach`` 0, at 0.01, under a rule on fresh query seeds 177 / 178: CPU
  per section 0.938-0.953, but ``marker`` on one index 5.142 -> 5.258 (margin 0.10): it failed, opt-in;
  each part alone saves 1-5 % on development. docs/atlas.md, "Session 45".
* **Stage 1 on every second shift** (session 46, opt-in ``stage1_lattice_margin``: None, every shift of
  every pair, the default). Stage 1 scores every pair first on the lattice of every second shift per
  axis through the shift (0, 0) (:meth:`~.pose_grid.Correlator.best_lattice`: the correlation there
  exactly, the spectrum folded onto half its frequencies and inverted at half the length per axis: a
  quarter of the inverse FFTs' points and of the score arithmetic), then at every shift only the pairs
  whose lattice best lies within the margin of their plate's (:meth:`~.pose_grid.SectionGrid._lattice_scores`;
  those pairs' results are the default's own, the others keep their lattice best, never above it). On
  development (query seed 171, both indexes, today's stain) at 0.01 the lookup cost 4-6 % less and ranked
  worse (+0.18 / +0.23), at 0.03 1.5 % less and +0.05 / +0.05: the lattice's loss (median 0.008, p90 0.030
  of a score) is as large as the gaps between a plate's pairs, and the spectral products and the score
  arithmetic stay. Not taken to a rule. docs/atlas.md, "Session 46".
* **Rotation climb** (session 46, opt-in ``stage1_rotation_climb``: False, every rotation, the default).
  Stage 1's second pass (:func:`_second_pass`) scores each plate's rotations outward from 0, one
  ``rotation_step`` at a time on each side, and turns a step further on a side only where the last step
  scored above every rotation nearer 0 there and the plate's rotation-0 best: a section's in-plane turn is
  one angle, and at stage 1's grid the score falls off smoothly with its error. Screened first on every
  stage-1 pair of 12 sections: the climb misses a plate's best turn on 4.5 % of plates (by 0.006), on none
  of each section's 6 best plates. Development (query seed 171, both indexes, today's stain): stage-1 pairs
  702 -> 542 and 720 -> 550, CPU per section 0.951 / 0.943, rankings identical on 59 / 60 and 58 / 60, but
  the sections that moved lost (mean rank +0.033 / +0.183): a 5-6 % saving, not taken to a rule.
  docs/atlas.md, "Session 46".
* **Stage 2's canvas** (session 46, opt-in ``stage2_canvas``: None, :data:`~.pose_grid.CANVAS` 1.4, the
  default). Stage 2's grid on a canvas of that many tissue extents: at 1.2, 67 pixels for the work size
  56 instead of 78, an 81-pixel FFT instead of 96 whose 29 x 29 shifts are :data:`LOCAL_REACH`'s +-14
  exactly (96 searches +-18). On development (query seed 171, both indexes, today's stain) CPU per
  section 0.937 / 0.953 and mean rank +0.10 / +0.25 (oblique sections lose): not taken to a rule.
  docs/atlas.md, "Session 46".
* **Lean** (session 42; since session 43 the only code path, and the ``lean`` option does nothing: True
  and False are accepted, as saved options and session 42's commands name it, and both give the same
  search, whose results were the path before's bit for bit; the options record True, what ran). The same
  search with less work, every value bit for bit: the edge fields with two array passes fewer, a cut's
  channels written into one stack before its FFT, every oblique cut and every plate cut through a given
  atlas point made once per section (about 9 % of them were made again: the same tilt, plate, pivot and
  scale asked by another hypothesis, round or scan), every pair of such a cut and a section variant
  correlated once, the field's second spectral product added in place, an oblique batch's spectra taken
  as a view instead of stacked again. Development (query seed 5, 60 sections per index, load 10-12):
  rankings, poses and pair counts identical on 120 of 120, CPU per lookup per section b / a median 0.883
  / 0.918 (index 0 / 1). Fresh query seeds 163 / 164 (the rule written first; 240 sections, load 10-11):
  identical 240 / 240, b / a 0.903 / 0.909, 482 / 473 -> 428 ms: it passes. The lead's held-out query
  seeds 157 / 158 (240 sections, load 11-12): identical 240 / 240, b / a 0.890 / 0.878 (493 / 492 -> 436
  / 434 ms): the default since then. It holds the cuts it made until the search ends (a median 36 MiB,
  at most 60 MiB, at a search's end; a process's peak resident memory over 10 sections 539 -> 647 MiB,
  more than the memo holds, not traced). docs/atlas.md, "Session 42".
* **Cost.** Untilted cuts of stage 1 depend only on the plate and on plate pixels per canvas
  pixel, which come from a fixed geometric grid: they are cached across sections
  (:data:`.pose_grid.CUT_CACHE_BYTES`). Stage 2 centres its cuts on the stage-1 pose and searches
  shifts within :data:`LOCAL_REACH` of it (smaller FFTs). Defaults (session 9, phantom benchmark):
  the embedding's 12 best plates and every 6th plate give the accuracy of 25 and every 3rd (mean
  rank 2.45 / 3.82 on query seeds 0 / 1, against 2.95 / 3.8 with session 8's search) at about
  0.5 s of CPU per section (session 8's search: 1.16 s, measured at the same moment). Session 10
  (session-9 index): the joint tilt search and 2 anchors took the mean rank from 1.73 / 3.73 to
  1.57 / 2.78 (query seeds 0 / 1; 3.72 -> 2.53 on seed 6, 2.77 -> 3.05 on seed 5) for about 13 %
  more CPU. Session 13: the inverse FFTs of stage 2 transform back only the rows of its shifts, 64
  pairs per batch (:mod:`.pose_grid`): the same rankings for about 20-30 % less CPU. Stage 1 searches
  every shift that keeps half the section's tissue on the slice (:func:`coarse_grid`). :data:`SEEDED`
  is the search for a first stage that is already close.
* **Ranking.** A pose's plate is the atlas ``z`` of the section's tissue centre under it (what users
  mean by the plate of a section). Every plate ``p`` gets the distance
  ``1 - max over stage-2 poses (score - plate_penalty * |z - p|)`` (0 for a perfect match, 1 for no
  similarity, more for plates far from every good pose), so the plates next to the best pose
  follow it; ties keep the embedding's order. ``plate_penalty`` 0.005 (0.01 before session 14): a
  plate where a good pose was found ranks before a plate that only lies next to the best pose, which
  is often a few plates off. Same searches, query seeds 0 / 1 / 5 / 6: mean rank 1.62 / 2.93 / 2.27 /
  2.17 against 1.58 / 3.05 / 2.48 / 2.37 (2.25 against 2.37 over the 240 sections, Top-5 88.8 against
  87.1 %); chosen among 0.005, 0.02 and 0.03 on those, then checked on 120 fresh sections (seeds 2 / 3:
  1.75 / 1.73 against 2.12 / 1.80). It moves the top plate only between poses within half a
  penalty of each other (Top-1 38.8 against 39.6 % on the 240, 45.8 against 45.0 % on the 120).
  ``penalty_reach`` (8 plates, session 21; None before): the penalty stops growing there, so a plate
  farther than that from every pose that scores within ``plate_penalty * penalty_reach`` of the best
  ranks by the first stage's order, not by how far it lies from the (often wrong) best pose: the
  search compares plates only near its poses (``z_scan`` 6 each side), and beyond that it knows little
  about a plate. A fixed number of plates (it does not follow ``z_scan``). The first 8 places never
  change (the plates within 8 of the best pose score above the bound), so Top-1/3/5 are as before;
  only sections whose truth lies far from every good pose move. Chosen with ``outside_weight`` 0.3
  among 4 / 6 / 8 / 10 on the development sections and query seeds 45-47 / 53-58 (1,500): 8 ranked
  best on development (1.692 against 1.785 at 6) and 45-47 / 53-55 (1.572 against 1.706) and tied on
  56-58 (1.300); docs/atlas.md ("Ranking beyond the search's reach, session 21").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from ...core.errors import InputError
from ...core.options import check_bool, check_choice, check_float, check_int, check_known
from .plates import Plates
from .pose_grid import CANVAS, OUTSIDE_RING, AtlasGrid, Correlator, Pose, SectionGrid, cut_zone, extent
from .preprocess import _segment, downsample, to_grey
from .region_fit import RegionAtlas, SectionSamples, region_ratio
from .region_fit import refine as refine_pose

__all__ = ["DEFAULTS", "FAST", "SEEDED", "Pose", "PoseSearch", "RerankResult", "check_rerank_options"]

#: Options of the re-ranking (``rerank_options`` of :meth:`AtlasLookup.lookup`).
DEFAULTS = {
    "shortlist": 12,  # best plates of the embedding searched
    "neighbours": 3,  # plates on each side of each shortlisted plate also searched
    "sweep_step": 6,  # every this many plates of the whole atlas also searched in stage 1 (0: none)
    # where stage 1's evidence says the shortlist may have missed (at least dense_outside of stage 2's
    # starts lie outside the shortlisted plates), stage 1 again with every this many plates swept
    # instead of sweep_step's (module docstring, "Denser sweep where the shortlist was outscored"; 0: never)
    "dense_sweep": 0,
    "dense_outside": 2,
    # ... and then: "add" keeps stage 2's starts and adds up to dense_starts new ones on the new plates
    # (hypothesis_gap from each other and from every start stage 1 scored at least as well); "replace"
    # chooses every start again from the denser stage 1 (as sweep_step dense_sweep would)
    "dense_mode": "add",
    "dense_starts": 2,
    # stage 1 also scores the neighbours (``neighbours`` each side) of this many best swept plates
    # outside the shortlisted plates, as if shortlisted, and stage 2's starts are chosen again (0: none,
    # before session 34; module docstring, "Refining the sweep's best plates"): a region the embedding
    # missed is otherwise sampled every sweep_step-th plate against the shortlist's every plate
    "sweep_refine": 4,
    # ... only where at least this many of stage 2's starts lie outside the shortlisted plates (as
    # dense_outside; 0: wherever sweep_refine is on; fires on ~8 % of the phantom's sections, +2-4 % CPU)
    "sweep_outside": 2,
    # stage 1 in two passes (None: one pass, every pair, before session 30): rotation 0 of every plate
    # first, then the other rotations only on plates whose rotation-0 best lies within this much of
    # stage 2's weakest start among the plates scored so far (the anchors' plates always; module
    # docstring, "Two-pass stage 1"; about 15 % less CPU per lookup, the same ranks within noise)
    "stage1_prune": 0.05,
    # ... and the second pass scores each plate only at the scales within this many scale_step steps of
    # its rotation-0 best scale (None: every scale, the default; session 43, opt-in; an error without
    # stage1_prune; module docstring, "Scales near the rotation-0 best"): an in-plane turn of at most
    # max_rotation does not change how large the section's anatomy is against the plate's. At 1: 11-12 %
    # less CPU per lookup, today's stain the same on fresh and held-out seeds, but the lead's off-label
    # held-out condition failed on one index's marker stain (+0.133 mean rank, margin 0.10), so opt-in
    "stage1_scale_reach": None,
    # ... and also at every scale whose rotation-0 pose on that plate scores within this much of the
    # plate's rotation-0 best (None: the reach alone; session 44, opt-in; module docstring, "Scales near
    # the rotation-0 best"; an error without stage1_scale_reach): where the rotation-0 pass cannot tell the
    # scales apart (a stain that does not follow the atlas's regions), it cannot rule the far ones out
    "stage1_scale_margin": None,
    # ... and the second pass scores each plate's rotations outward from 0, a step further on a side only
    # where the last step there scored above every rotation nearer 0 (False: every rotation, the default;
    # session 46, opt-in; module docstring, "Rotation climb")
    "stage1_rotation_climb": False,
    # stage 1 scores every pair on every second shift per axis first (the exact correlation there, by
    # an FFT of half the length per axis), then every shift only of the pairs that score within this
    # much of their plate's best on that lattice (None: every shift of every pair, the default; session
    # 46, opt-in; module docstring, "Stage 1 on every second shift")
    "stage1_lattice_margin": None,
    # stage 2's canvas side in units of the section's tissue extent (None: pose_grid.CANVAS, 1.4, the
    # default; session 46, opt-in; module docstring, "Stage 2's canvas")
    "stage2_canvas": None,
    "coarse_size": 32,  # longest side (pixels) of a plate on the grid of stage 1
    "work_size": 56,  # ... and of stage 2
    "max_rotation": 15.0,  # in-plane rotation searched (degrees, either way)
    "rotation_step": 7.5,  # stage 1 (stage 2 halves it)
    "max_tilt": 12.0,  # pitch and yaw searched (degrees, either way; volumes only)
    "tilt_step": 6.0,
    "scale_step": 1.1,  # ratio of neighbouring scales of stage 1 (stage 2 halves it)
    "hypotheses": 4,  # distinct stage-1 poses refined in stage 2
    # ... at least this many plates apart (HYPOTHESIS_GAP, 3, before session 25; module docstring,
    # "Hypotheses apart")
    "hypothesis_gap": 3,
    "plate_penalty": 0.005,  # score lost per plate between a plate and a pose's plate (module docstring)
    # ... up to this many plates (None: no bound, before session 21): beyond it a plate's distance from
    # a pose no longer counts, so plates far from every good pose keep the first stage's order. A fixed
    # number of plates: it does not follow z_scan (SEEDED, whose z_scan is 0, keeps it)
    "penalty_reach": 8,
    # stage 2's untilted step in two passes: every plate cut at the hypothesis's rotation, the other
    # rotations only on the cuts within this much of the best of those (None: every rotation of every
    # cut, before session 31; module docstring, "Untilted step in two passes")
    "untilted_prune": 0.05,
    # a hypothesis whose best after the joint tilt grid lies more than this below the best pose so far
    # gets no finer grid, rotation and scale or second round (None: every hypothesis, before session
    # 31; module docstring, "Finer grid near the best"; the same rankings within noise, ~8 % less CPU). It
    # acts on tilt_search "joint" only: "sequential" has no finer grid, and there it does nothing
    "finer_margin": 0.08,
    # stage 2 refines only stage 1's best start (no other start, no anchor; one pose scanned along the
    # plate axis) where that start scores at least this much above every stage-1 pose more than
    # ROUTE_REACH plates from it (None: every start, the default; opt-in, module docstring, "Routing":
    # 0.05 saves ~15 % of the CPU at the same ranks within noise on development, and failed one of its
    # fresh check's marks); the result's ``routed`` says where it did
    "route_gap": None,
    # ... and only where that start's plate lies within this many plates of the first stage's best
    # plate (None: no such condition; an error without route_gap)
    "route_agree": None,
    "tilt_search": "joint",  # stage 2: every pitch x yaw, then finer; "sequential": pitch, then yaw
    # the joint grid climbed from the untilted best instead of cut whole: the 8 tilts one tilt_step
    # around the best so far, until none is better (module docstring, "Tilt climb"; False: every
    # pitch x yaw of the grid, as before session 31)
    "tilt_climb": False,
    # a hypothesis whose untilted best lies within this many plates of a better hypothesis's untilted
    # best gets no joint grid of its own: its finer grid (at its own plate, atlas point, rotation and
    # scale) is centred on the tilt that better one's joint grid found, and the rest of its tilt search
    # follows as before (None: every hypothesis cuts its own joint grid, as before session 44; the default
    # 1 since session 44, held out: module docstring, "Shared joint grid"; an error with tilt_climb or
    # tilt_search "sequential" when given, and None when those are given without it)
    "tilt_share": 1,
    # plates each side of a tilt_share follower's own plate that its finer grid cuts (None: FINE_DZ's
    # one each side, as session 44; 0: its own plate only, 9 cuts instead of 27; session 45, opt-in:
    # module docstring, "Follower's offsets"; an error where tilt_share is None)
    "share_finer_reach": None,
    # plates each side of a hypothesis's plate that stage 2's untilted step cuts (None: REFINE_PLATES,
    # 2, as before session 45; session 45, opt-in: module docstring, "Untilted reach")
    "untilted_reach": None,
    # stage 2's untilted step cuts each plate at the hypothesis's scale first, the scales either side
    # only on the plates scoring within this much of the best of those (None: every scale, as before
    # session 45; session 45, opt-in: module docstring, "Untilted scales"; an error without untilted_prune)
    "untilted_scale_prune": None,
    "anchors": 2,  # the first stage's best plates that always get a stage-2 hypothesis
    # score lost by a pose whose plate the first stage ranks far (0: none; the safe setting where the
    # embedding, trained on synthetic views of the atlas, is not trusted on real sections)
    "prior_weight": 0.02,
    # the prior's weight is prior_margin_weight instead where the first stage is confident: its best
    # distance lies at least this share of the way from its best plate's to its median below the best
    # distance of every plate more than PRIOR_MARGIN_REACH plates from that plate (None: prior_weight
    # everywhere, the default; session 38, opt-in: docs/atlas.md, "Session 38"). Exact replays on the
    # default searches of development query seeds 5-8: prior_margin 0.458 today's stain 1.917 -> 1.925
    # (Top-5 218 -> 218; 3 better / 1 worse), foreign 4.729 -> 4.596, marker (fluorescence-like) 13.814
    # -> 13.300; 0.363: 1.925 (217), 4.550, 13.243. Today's mean rank rose, so it is not the default
    "prior_margin": None,
    "prior_margin_weight": 0.04,
    "region_refine": 0,  # best distinct stage-2 poses refined by the correlation ratio (0: none)
    # tilts searched only for hypotheses whose untilted stage-2 best lies within this much of the
    # best hypothesis's (None: every hypothesis, the default)
    "tilt_margin": None,
    # where a hypothesis's untilted best lies on another plate than the hypothesis's own, the tilt
    # search also runs at the best untilted pose on its own plate (under tilt_margin's rule, after every
    # hypothesis's own tilt search; False: the default). Session 38, opt-in (docs/atlas.md, "Session 38"):
    # development query seeds 5-8 today's stain 1.917 -> 1.812, foreign 4.729 -> 4.383, marker
    # (fluorescence-like) 13.814 -> 14.043; seeds 146 / 147 today's 1.708 -> 1.567, foreign 3.392 ->
    # 3.217; CPU +25-29 % (about 3 more tilt searches per section). The lead's held-out query seeds
    # 148 / 154 fail every mark (today's 2.208 -> 2.258, Top-5 112 -> 108; foreign 7 better / 13 worse)
    "own_plate_tilt": False,
    "z_scan": 6,  # plates each side of a best stage-2 pose re-cut at its tilt, rotation and scale (0: none)
    "z_scan_poses": 2,  # best distinct stage-2 poses (HYPOTHESIS_GAP apart) scanned along the plate axis
    # grid pixels (Gaussian sigma) of the blurred copy whose edge field is averaged with the plain
    # one (0: the plain field alone; pose_grid.field)
    "edge_blur": 1.2,
    # a second pass (every plate in stage 1, new hypotheses in stage 2) when no pose scores above
    # this (None: never, the default; opt-in, module docstring, "Widening"; session 20: 0.3 gained on
    # development sections and tied on held-out ones; SEEDED and FAST were measured without it)
    "widen_score": None,
    # ... or when the best pose lies more than this many plates from every shortlisted plate
    # (None: never, the default: 6 tied on fresh sections for more CPU)
    "widen_gap": None,
    # a pose's score times 1 - this much of the share of the band just outside the section's tissue
    # that lies on the atlas's tissue (pose_grid.OUTSIDE_RING; 0: none, before session 21; module
    # docstring, "Outside band")
    "outside_weight": 0.3,
    # the band is spared beyond straight runs of the section's outline (cut edges, pose_grid.straight_runs)
    # and, where the tissue reaches the image's edge, beyond the image (False: the whole band counts);
    # this and the next two do nothing where outside_weight is 0 (no band)
    "spare_cuts": False,
    # share of the band on atlas tissue that costs nothing; above it the cost grows to outside_weight
    # at a share of 1 (0: every share costs)
    "outside_free": 0.0,
    # plates within this many of the best pose are ordered by the similarity without the outside band
    # (the band picks the region, the similarity the plate; None: the band's score throughout, before
    # session 22; no effect without the band, as in SEEDED and FAST)
    "plain_reach": 1,
    # rounds of tilt, then rotation and scale, around each hypothesis (module docstring, "Tilt
    # rounds"): after the first, where rotation or scale moved, the finer tilt grid again at the new
    # ones, then rotation and scale again (1: one round, before session 23)
    "tilt_rounds": 2,
    # score gained per nat of mutual information of the section's and the atlas's intensities
    # (pose_grid.information) by the plates whose best pose lies within information_margin of the
    # best pose (score less prior), over the least of them (module docstring, "Information"; 0: none)
    "information_weight": 0.0,
    "information_margin": 0.05,
    # score gained per unit of the correlation ratio of the section's intensities given the atlas's
    # regions (region_fit.correlation_ratio) by the plates whose best pose lies within region_margin
    # of the best pose (score less prior), over the least of them (module docstring, "Regions"; 0:
    # none, the default: opt-in, module docstring; nothing without an annotation); region_refit: each
    # such pose first moved to a local maximum of the ratio with its plate position fixed
    # (region_fit.refine, free_z False); session 35's measured setting: {"region_weight": 0.1}
    "region_weight": 0.0,
    "region_margin": 0.03,
    "region_refit": True,
    # the best pose of each plate within quarter_margin of the best pose (score less prior) moved along
    # the plate axis by this share of the tissue-weighted mean of its quarters' best plate offsets
    # (pose_grid.SectionGrid.quarter_offsets, each within quarter_reach plates; volumes only; module
    # docstring, "Quarters"; session 40, opt-in: it failed its fresh check, a moved pose keeps the score of
    # its cut before the move; 0: none, the default)
    "quarter_shift": 0.0,
    "quarter_margin": 0.05,
    "quarter_reach": 4,
    # quarter_shift acts only on sections whose stain reads like the atlas's (module docstring,
    # "Quarters"; session 41, opt-in; an error without quarter_shift): "polarity", where the section's
    # background is bright or dark as the atlas's (pose_grid.AtlasGrid.bright); a number, where the
    # correlation of the section's intensities with the atlas's at the best pose (score less prior),
    # each in its own polarity (pose_grid.SectionGrid.level_correlation), lies above it; None: every
    # section (session 40's option, bit for bit); "polarity" failed its fresh check (index 0 foreign Top-5)
    "quarter_gate": None,
    # the best pose of each plate within aspect_margin of the best pose (score less prior) cut again
    # with its rows and columns scaled apart by each of these ratios (module docstring, "Aspect";
    # empty: none)
    "aspects": [],
    "aspect_margin": 0.05,
    # ... only where that pose is tilted by at most this many degrees about either axis (None: every
    # pose; 0: untilted poses alone, where a stretch cannot stand in for a tilt); an error without aspects
    "aspect_max_tilt": None,
    # session 42's "the same search with less work" (module docstring, "Lean"): the one code path since
    # session 43, so this option does nothing; True and False are accepted because saved options and
    # session 42's commands name it and both paths gave the same results bit for bit, and the options
    # record True, the path that ran (review 1 of session 43, C3; the search holds the cuts it made until
    # it ends: 36-60 MiB of spectra)
    "lean": True,
}
#: Options of a seeded search, for a first stage whose best plate lies within about 2 plates of the
#: truth: no sweep of the atlas, its best plate and 2 neighbours each side in stage 1, one
#: hypothesis (plus the anchor) in stage 2; the other options are :data:`DEFAULTS`', so since
#: session 16 also ``edge_blur`` and ``prior_weight`` (the numbers below were measured before them).
#: With a simulated first stage off by up to 2 plates
#: (benchmarks/atlas_rerank_diagnosis.py --simulate-offset 2) mean rank 1.30 / 1.52 on query seeds
#: 0 / 1 at 113-138 ms CPU per section (load 3.5-5), against 0.5 s for the defaults. With session
#: 10's cell vote as the first stage it is not yet that close: 6.98 / 5.98 (partial and combined
#: sections misplaced by the vote), 142 ms; the defaults on that index: 2.22 / 2.98. Session 12, from the
#: embedding with its framings (:mod:`.framing`): 6.80 / 6.17 / 6.77 / 8.10 on query seeds 0 / 1 / 5 / 6
#: at 115-126 ms; with a perfect signal of when the first stage is within 2 plates (seeded then, the
#: defaults otherwise) the mean cost would still be ~300 ms: no adaptive use of it reaches 50 ms.
#: Session 13's cheaper correlations: 67-69 ms (7.08 / 5.70 on seeds 0 / 1 from the interleaved order).
#: It never widens (its premise is a first stage within about 2 plates) and leaves the outside band
#: (session 21) off: measured without it, which costs about 17 % more CPU. Stage 1 in one pass
#: (``stage1_prune`` None, session 30's default 0.05 unmeasured here), every finer grid and every
#: rotation of the untilted step (``finer_margin`` / ``untilted_prune`` None: session 31's defaults
#: unmeasured here).
SEEDED = {
    "sweep_refine": 0,
    "stage1_prune": None,
    "finer_margin": None,
    "untilted_prune": None,
    "sweep_step": 0,
    "shortlist": 1,
    "neighbours": 2,
    "hypotheses": 1,
    "anchors": 1,
    "z_scan": 0,
    "widen_score": None,
    "widen_gap": None,
    "outside_weight": 0.0,
    "tilt_rounds": 1,
    "tilt_share": None,  # as measured (session 44's default unmeasured here)
}
#: Options of a search about half as costly as :data:`DEFAULTS`' that ranks worse (opt-in, for
#: many sections where speed matters more): a smaller stage 1 (the embedding's 6 best plates and 2
#: neighbours each side, every 12th plate) and stage 2 (2 hypotheses, 1 anchor, 1 pose scanned along
#: the plate axis). Session 18, session 13's index (docs/atlas.md, "A fast first stage"): CPU median
#: 338 -> 174 ms (same process and sections, load 13); mean rank 2.141 -> 2.334 and Top-5 91.3 -> 89.1 %
#: over 960 development sections (seeds 0 / 1 / 5-10: 2.346 -> 2.823; seeds 11 / 12 / 19-22 / 24 / 25:
#: 1.935 -> 1.844, but Top-5 92.3 -> 89.8 %), 1.592 -> 1.725 and Top-5 94.2 -> 92.9 % on query seeds
#: 40-43, 1.55 -> 2.42 and Top-5 92.8 -> 89.7 % on the lead's held-out seeds 34-39. About 0.1-0.9 of
#: mean rank and 1-3 points of Top-5 for half the CPU.
#: Measured without the widening and the outside band (session 21, ~17 % more CPU), which it leaves off,
#: and with stage 1 in one pass (``stage1_prune`` None; session 30's default 0.05 unmeasured here), as
#: with every finer grid and every rotation of the untilted step (session 31's defaults unmeasured here).
FAST = {
    "sweep_refine": 0,
    "stage1_prune": None,
    "finer_margin": None,
    "untilted_prune": None,
    "shortlist": 6,
    "neighbours": 2,
    "sweep_step": 12,
    "hypotheses": 2,
    "anchors": 1,
    "z_scan_poses": 1,
    "widen_score": None,
    "widen_gap": None,
    "outside_weight": 0.0,
    "tilt_rounds": 1,
    "tilt_share": None,  # as measured (session 44's default unmeasured here)
}
#: Scales searched, as factors of the tissue-extent guess: a cut shortens the extents (the true
#: scale is then larger than the guess); a whole section matches it within a specimen's variation.
MIN_SCALE_FACTOR = 0.88
MAX_SCALE_FACTOR = 1.55
#: The section is segmented and resampled from a copy at most this many times ``work_size`` long.
SECTION_FACTOR = 4
#: Stage-2 hypotheses lie at least this many plates apart.
HYPOTHESIS_GAP = 3
#: ``route_gap`` compares stage 1's best start with the stage-1 poses more than this many plates from it.
ROUTE_REACH = 3
#: ``prior_margin``: the first stage's margin is measured against the plates more than this many
#: plates from its best plate (its neighbours share its region).
PRIOR_MARGIN_REACH = 5
#: Plates on each side of a hypothesis searched again in stage 2.
REFINE_PLATES = 2
#: Stage 2 searches shifts up to this share of ``work_size`` (canvas pixels per axis) from the
#: stage-1 pose (whose error is a coarse pixel or two): smaller FFTs than a search of every shift.
LOCAL_REACH = 0.25
#: Plate offsets of the cuts of the joint pitch x yaw grid and of the finer grid after it (measured:
#: the finer grid at offset 0 alone, mean rank 2.07 / 2.98 against 1.57 / 2.78 on query seeds 0 / 1).
JOINT_DZ = (0,)
FINE_DZ = (-1, 0, 1)
#: Poses refined by the correlation ratio start at least this many plates apart.
REGION_GAP = 2.0
#: The ``region_weight`` term's refit (region_fit.refine): the section sampled at most this many pixels
#: along its tissue's longer side, the pattern search stopped after this many halvings of its steps or
#: this many moves (region_refine's are 64, 3 and 40): about half its CPU at about the same rankings
#: (session 35, docs/atlas.md).
REGION_FIT_SIZE = 48
REGION_HALVINGS = 2
REGION_MOVES = 20


def check_rerank_options(options: dict | None) -> dict:
    """Validated re-ranking options with :data:`DEFAULTS` filled in; :class:`InputError` for bad ones."""
    if options is not None and not isinstance(options, dict):
        raise InputError(
            f"rerank_options must be a dict of option names to values, got {type(options).__name__}."
        )
    options = dict(options or {})
    check_known("rerank", options, DEFAULTS)
    out = {**DEFAULTS, **options}
    out["shortlist"] = check_int("shortlist", out["shortlist"], 1)
    out["neighbours"] = check_int("neighbours", out["neighbours"], 0, 50)
    out["sweep_step"] = check_int("sweep_step", out["sweep_step"], 0)
    out["dense_sweep"] = check_int("dense_sweep", out["dense_sweep"], 0)
    out["dense_outside"] = check_int("dense_outside", out["dense_outside"], 1, 50)
    out["dense_mode"] = check_choice("dense_mode", out["dense_mode"], ("add", "replace"))
    out["dense_starts"] = check_int("dense_starts", out["dense_starts"], 1, 50)
    out["sweep_refine"] = check_int("sweep_refine", out["sweep_refine"], 0, 50)
    out["sweep_outside"] = check_int("sweep_outside", out["sweep_outside"], 0, 50)
    if out["dense_sweep"] and not 0 < out["dense_sweep"] < out["sweep_step"]:  # review 1 of session 29, C1
        raise InputError(
            f"dense_sweep ({out['dense_sweep']!r}) must be smaller than sweep_step ({out['sweep_step']!r}): "
            "it replaces the sweep where the sweep's plates outscore the shortlist (so it could never fire "
            "without a sweep), and a larger step would sweep fewer plates. Use e.g. dense_sweep 3 with "
            "sweep_step 6, or dense_sweep 0 (off)."
        )
    if out["stage1_prune"] is not None:
        out["stage1_prune"] = check_float("stage1_prune", out["stage1_prune"], 0.0, 2.0)
    if out["stage1_scale_reach"] is not None:
        out["stage1_scale_reach"] = check_int("stage1_scale_reach", out["stage1_scale_reach"], 0, 20)
        _needs(
            out,
            "stage1_scale_reach",
            "stage1_prune",
            "limits the scales of stage 1's second pass, which runs only with stage1_prune (e.g. 0.05, the "
            "default)",
        )
    if out["stage1_scale_margin"] is not None:
        out["stage1_scale_margin"] = check_float("stage1_scale_margin", out["stage1_scale_margin"], 0.0, 2.0)
        _needs(
            out,
            "stage1_scale_margin",
            "stage1_scale_reach",
            "keeps more scales than stage1_scale_reach's, which without it keeps every scale already (set it "
            "e.g. to 1)",
        )
    out["stage1_rotation_climb"] = check_bool("stage1_rotation_climb", out["stage1_rotation_climb"])
    if out["stage1_lattice_margin"] is not None:
        out["stage1_lattice_margin"] = check_float(
            "stage1_lattice_margin", out["stage1_lattice_margin"], 0.0, 2.0
        )
    if out["stage2_canvas"] is not None:
        out["stage2_canvas"] = check_float("stage2_canvas", out["stage2_canvas"], 1.1, 3.0)
    out["coarse_size"] = check_int("coarse_size", out["coarse_size"], 16, 256)
    if out["stage1_lattice_margin"] is not None:  # the lattice halves stage 1's FFT length: it must be even
        side = int(round(CANVAS * out["coarse_size"]))
        pad = Correlator((side, side)).pad[0]
        if pad % 2:
            raise InputError(
                f"stage1_lattice_margin needs an even FFT length in stage 1, and coarse_size "
                f"{out['coarse_size']} gives {pad}: choose another coarse_size (e.g. 32, the default) or "
                "leave stage1_lattice_margin at None"
            )
    out["work_size"] = check_int("work_size", out["work_size"], 16, 256)
    out["max_rotation"] = check_float("max_rotation", out["max_rotation"], 0.0, 180.0)
    out["rotation_step"] = check_float("rotation_step", out["rotation_step"], 0.5, 90.0)
    out["max_tilt"] = check_float("max_tilt", out["max_tilt"], 0.0, 45.0)
    out["tilt_step"] = check_float("tilt_step", out["tilt_step"], 0.5, 45.0)
    out["scale_step"] = check_float("scale_step", out["scale_step"], 1.01, 2.0)
    out["hypotheses"] = check_int("hypotheses", out["hypotheses"], 1, 50)
    out["hypothesis_gap"] = check_int("hypothesis_gap", out["hypothesis_gap"], 1, 50)
    out["plate_penalty"] = check_float("plate_penalty", out["plate_penalty"], 0.0, 1.0)
    if out["penalty_reach"] is not None:
        out["penalty_reach"] = check_int("penalty_reach", out["penalty_reach"], 0)
    out["tilt_search"] = check_choice("tilt_search", out["tilt_search"], ("sequential", "joint"))
    out["tilt_climb"] = check_bool("tilt_climb", out["tilt_climb"])
    if out["tilt_climb"] and out["tilt_search"] != "joint":  # review 1 of session 31, C2
        raise InputError(
            "tilt_climb climbs the joint pitch x yaw grid, so it needs tilt_search 'joint' (the "
            f"default), not {out['tilt_search']!r}: pass one or the other."
        )
    whole_grid = not out["tilt_climb"] and out["tilt_search"] == "joint"  # tilt_share shares its best
    if "tilt_share" not in options and not whole_grid:
        out["tilt_share"] = None  # the default steps aside: there is no whole grid to share
    if out["tilt_share"] is not None:
        out["tilt_share"] = check_int("tilt_share", out["tilt_share"], 0, 1000)
        if not whole_grid:
            raise InputError(
                f"tilt_share ({out['tilt_share']!r}) shares the joint pitch x yaw grid's best tilt, so it "
                "needs tilt_search 'joint' (the default) and tilt_climb False (the default), which climbs "
                "that grid instead; pass one or the other."
            )
    if out["share_finer_reach"] is not None:
        out["share_finer_reach"] = check_int("share_finer_reach", out["share_finer_reach"], 0, 1)
        _needs(
            out,
            "share_finer_reach",
            "tilt_share",
            "sets the plate offsets of a tilt_share follower's finer grid, and without tilt_share no "
            "hypothesis follows (tilt_share is 1 by default; tilt_climb or tilt_search 'sequential' "
            "turn it off)",
        )
    if out["untilted_reach"] is not None:
        out["untilted_reach"] = check_int("untilted_reach", out["untilted_reach"], 0, 10)
    if out["untilted_scale_prune"] is not None:
        out["untilted_scale_prune"] = check_float(
            "untilted_scale_prune", out["untilted_scale_prune"], 0.0, 2.0
        )
        _needs(
            out,
            "untilted_scale_prune",
            "untilted_prune",
            "adds a scale pass before untilted_prune's rotation pass, which it runs on the cuts it made (set "
            "untilted_prune e.g. to 0.05, the default)",
        )
    if out["finer_margin"] is not None:
        out["finer_margin"] = check_float("finer_margin", out["finer_margin"], 0.0, 2.0)
    if out["untilted_prune"] is not None:
        out["untilted_prune"] = check_float("untilted_prune", out["untilted_prune"], 0.0, 2.0)
    if out["route_gap"] is not None:
        out["route_gap"] = check_float("route_gap", out["route_gap"], 0.0, 2.0)
    if out["route_agree"] is not None:
        out["route_agree"] = check_int("route_agree", out["route_agree"], 0)
        if out["route_gap"] is None:  # review 1 of session 32, C3: it would silently do nothing
            raise InputError(
                f"route_agree ({out['route_agree']!r}) is a further condition of the routing, which runs "
                "only with route_gap (e.g. 0.05); set route_gap or leave route_agree None."
            )
    out["anchors"] = check_int("anchors", out["anchors"], 0, 50)
    out["prior_weight"] = check_float("prior_weight", out["prior_weight"], 0.0, 1.0)
    if out["prior_margin"] is not None:
        out["prior_margin"] = check_float("prior_margin", out["prior_margin"], 0.0, 1.0)
    out["prior_margin_weight"] = check_float("prior_margin_weight", out["prior_margin_weight"], 0.0, 1.0)
    out["region_refine"] = check_int("region_refine", out["region_refine"], 0, 50)
    if out["tilt_margin"] is not None:
        out["tilt_margin"] = check_float("tilt_margin", out["tilt_margin"], 0.0, 2.0)
    out["own_plate_tilt"] = check_bool("own_plate_tilt", out["own_plate_tilt"])
    out["z_scan"] = check_int("z_scan", out["z_scan"], 0, 50)
    out["z_scan_poses"] = check_int("z_scan_poses", out["z_scan_poses"], 1, 50)
    out["edge_blur"] = check_float("edge_blur", out["edge_blur"], 0.0, 8.0)
    if out["widen_gap"] is not None:
        out["widen_gap"] = check_int("widen_gap", out["widen_gap"], 0)
    if out["widen_score"] is not None:
        out["widen_score"] = check_float("widen_score", out["widen_score"], -1.0, 1.0)
    out["outside_weight"] = check_float("outside_weight", out["outside_weight"], 0.0, 1.0)
    out["spare_cuts"] = check_bool("spare_cuts", out["spare_cuts"])
    out["outside_free"] = check_float("outside_free", out["outside_free"], 0.0, 0.9)
    if out["plain_reach"] is not None:
        out["plain_reach"] = check_int("plain_reach", out["plain_reach"], 0, 50)
    out["tilt_rounds"] = check_int("tilt_rounds", out["tilt_rounds"], 1, 4)
    out["information_weight"] = check_float("information_weight", out["information_weight"], 0.0, 10.0)
    out["information_margin"] = check_float("information_margin", out["information_margin"], 0.0, 1.0)
    out["region_weight"] = check_float("region_weight", out["region_weight"], 0.0, 10.0)
    out["region_margin"] = check_float("region_margin", out["region_margin"], 0.0, 1.0)
    out["region_refit"] = check_bool("region_refit", out["region_refit"])
    out["quarter_shift"] = check_float("quarter_shift", out["quarter_shift"], 0.0, 1.0)
    out["quarter_margin"] = check_float("quarter_margin", out["quarter_margin"], 0.0, 1.0)
    out["quarter_reach"] = check_int("quarter_reach", out["quarter_reach"], 1, 12)
    if out["quarter_gate"] is not None:
        if out["quarter_gate"] != "polarity":
            if isinstance(out["quarter_gate"], str):
                raise InputError(
                    f"quarter_gate must be None, 'polarity' or a correlation in [-1, 1] (e.g. 0.0), got "
                    f"{out['quarter_gate']!r}."
                )
            out["quarter_gate"] = check_float("quarter_gate", out["quarter_gate"], -1.0, 1.0)
        if out["quarter_shift"] == 0:  # it would silently do nothing
            raise InputError(
                f"quarter_gate ({out['quarter_gate']!r}) chooses the sections quarter_shift acts on, which "
                "moves nothing at 0; set quarter_shift (e.g. 0.5) or leave quarter_gate None."
            )
    out["aspects"] = _check_aspects(out["aspects"])
    out["aspect_margin"] = check_float("aspect_margin", out["aspect_margin"], 0.0, 1.0)
    if out["aspect_max_tilt"] is not None:
        out["aspect_max_tilt"] = check_float("aspect_max_tilt", out["aspect_max_tilt"], 0.0, 90.0)
        if not out["aspects"]:  # review 1 of session 27, C1: it would silently do nothing
            raise InputError(
                f"aspect_max_tilt ({out['aspect_max_tilt']!r}) limits the aspect step, which runs only where "
                "'aspects' lists ratios (e.g. [0.94, 0.97, 1.03, 1.06]); set aspects or leave "
                "aspect_max_tilt None."
            )
    check_bool("lean", out["lean"])  # no effect since session 43 (DEFAULTS' comment): recorded as what ran
    out["lean"] = True
    return out


def _needs(out: dict, name: str, other: str, why: str) -> None:
    """:class:`InputError` where option ``name`` is set and ``other``, without which it would silently do
    nothing, is None (``why``: what ``name`` does and why it needs ``other``)."""
    if out[other] is None:
        raise InputError(f"{name} ({out[name]!r}) {why}; set {other} or leave {name} None.")


def _check_aspects(value) -> list[float]:
    """The ``aspects`` option as a list of ratios in [0.5, 2], each other than 1 (1 is every pose's;
    a list, so the recorded options read back the same from JSON)."""
    try:
        ratios = [float(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"aspects must be a list of ratios (rows over columns, e.g. [0.94, 1.06]), got {value!r}."
        ) from exc
    for r in ratios:
        if not (0.5 <= r <= 2.0) or r == 1.0:
            raise InputError(f"aspects must be ratios in [0.5, 2] other than 1, got {r!r} in {value!r}.")
    return ratios


@dataclass
class RerankResult:
    """``ranking``: ``[(plate, distance), ...]`` of every plate, best first (see the module);
    ``poses``: the best stage-2 pose whose tissue centre lies on each plate reached;
    ``pairs``: how many (section variant, atlas cut) pairs were scored; ``widened``: whether the
    second pass ran (``widen_score`` or ``widen_gap``); ``widen_kept``: whether its poses were kept
    (one of them ranked first); ``options``: every re-ranking option the search ran with
    (:func:`check_rerank_options`' dict, defaults filled in; ``rerank_options=result.options``
    repeats the ranking); ``plain_ranked``: whether ``plain_reach`` ordered the plates next to the
    best pose (False where it is None or the outside band is off, as in :data:`SEEDED` and :data:`FAST`);
    ``densified``: whether stage 1 added the ``dense_sweep`` plates (its starts outscored the shortlist);
    ``routed``: whether stage 2 refined stage 1's best start alone (``route_gap``); ``refined``: whether
    stage 1 also scored the neighbours of the best swept plates (``sweep_refine``; False where none was
    left to score, e.g. with ``neighbours`` 0, where the option can do nothing); ``prior_weight``: the
    prior's weight the ranking used (``prior_margin_weight`` where ``prior_margin`` found the first
    stage confident, else ``prior_weight``); ``own_plate_tilts``: how many tilt searches ``own_plate_tilt``
    added (0 without it); ``quarter_moved``: how many poses ``quarter_shift`` set
    :attr:`.pose_grid.Pose.shifted` on (by 0.0 too, where the quarters agreed with the pose; 0 without
    it, and always 0 on a list of 2D plates, where the option is recorded in ``options`` but can move
    nothing: there is no plate axis to cut along); with ``quarter_gate`` (volumes, ``quarter_shift`` on),
    ``quarter_reading``: the correlation of the section's levels with the atlas's at the best pose
    (:meth:`.pose_grid.SectionGrid.level_correlation`; NaN where too little tissue is shared), read in
    either mode, and ``quarter_open``: whether the gate let ``quarter_shift`` act (by the polarity, or
    the reading above the number; a NaN reading shuts a number's gate); where it is shut
    ``quarter_moved`` is 0; both None without the gate."""

    ranking: list[tuple[int, float]]
    poses: dict[int, Pose] = field(default_factory=dict)
    pairs: int = 0
    #: of ``pairs``, those of stage 1 (its widening's included; session 43)
    stage1_pairs: int = 0
    #: tilt searches that ``tilt_share`` started from another hypothesis's joint-grid tilt instead of a
    #: joint grid of their own (the widening's second pass's too; 0 without it; session 44)
    tilts_shared: int = 0
    widened: bool = False
    widen_kept: bool = False
    options: dict = field(default_factory=dict)
    plain_ranked: bool = False
    densified: bool = False
    routed: bool = False
    refined: bool = False
    prior_weight: float = 0.0
    own_plate_tilts: int = 0
    quarter_moved: int = 0
    quarter_reading: float | None = None
    quarter_open: bool | None = None


def _steps(limit: float, step: float) -> list[float]:
    k = int(math.floor(limit / step + 1e-9))
    return [i * step for i in range(-k, k + 1)]


class PoseSearch:
    """The pose search of sections in one atlas; the downsampled atlases are built once and reused."""

    def __init__(self, plates: Plates):
        self._plates = plates
        self._grids: dict[int, AtlasGrid] = {}
        self._regions: RegionAtlas | None = None
        self.n = plates.n
        self.is_volume = plates.volume is not None

    def atlas(self, size: int) -> AtlasGrid:
        """The atlas downsampled to plates ``size`` pixels long (built on first use)."""
        if size not in self._grids:
            self._grids[size] = AtlasGrid(self._plates, size)
        return self._grids[size]

    @staticmethod
    def prepare(section, longest: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(grey, bright tissue on black; its tissue mask; section pixels per pixel of it) of a
        section at most ``longest`` pixels long. The section is not modified."""
        return PoseSearch._prepare(section, longest)[:3]

    @staticmethod
    def _prepare(section, longest: int) -> tuple[np.ndarray, np.ndarray, float, bool]:
        """:meth:`prepare`'s and whether the section's background was bright (it was inverted)."""
        full = max(np.shape(section)[:2])
        grey = to_grey(downsample(section, 2 * longest, "section"), "section")
        if max(grey.shape) > longest:
            k = longest / max(grey.shape)
            size = (max(8, round(grey.shape[1] * k)), max(8, round(grey.shape[0] * k)))
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        mask, bright, _ = _segment(grey)
        if mask.sum() < 16:
            raise InputError(
                "The section has no tissue: nothing stands out from its background. Pass a section that "
                "shows the brain slice."
            )
        if bright:
            grey = 1.0 - grey
        return np.where(mask, grey, np.float32(0.0)).astype(np.float32), mask, full / max(grey.shape), bright

    def regions(self) -> RegionAtlas:
        """The atlas's regions for the correlation ratio (built on first use)."""
        if self._regions is None:
            self._regions = RegionAtlas(self._plates)
        return self._regions

    def _region_refine(self, grey, mask, centre, poses: list[Pose], options: dict) -> list[Pose]:
        """The ``region_refine`` best distinct stage-2 poses refined by the correlation ratio."""
        regions = self.regions()
        samples = SectionSamples(grey, mask, centre)
        starts = _distinct(poses, options["region_refine"], gap=REGION_GAP)
        return [
            refine_pose(regions, samples, p, options["max_tilt"], options["max_rotation"]) for p in starts
        ]

    def search(self, section, order: list[tuple[int, float]], options: dict, progress=None) -> RerankResult:
        """Poses of ``section`` near the first ``shortlist`` plates of the embedding's ranking
        ``order`` (every plate, best first), and the ranking they give (see the module).
        ``options``: :func:`check_rerank_options`'s; ``progress``: checked for cancel between steps."""
        grey, mask, zoom, bright = self._prepare(section, SECTION_FACTOR * options["work_size"])
        coarse_atlas = self.atlas(options["coarse_size"])
        spare = None
        if options["spare_cuts"] and options["outside_weight"] > 0:
            spare = cut_zone(mask, max(1, round(OUTSIDE_RING * float(extent(mask).max()))))
        band = {"spare": spare, "free": options["outside_free"]}
        coarse = coarse_grid(
            grey,
            mask,
            options["coarse_size"],
            options["edge_blur"],
            options["outside_weight"],
            **band,
            lattice_margin=options["stage1_lattice_margin"],
        )
        shortlist = [int(p) for p, _ in order[: options["shortlist"]]]
        zs = _around(shortlist, options["neighbours"], self.n)
        if options["sweep_step"] > 0:  # a sweep of the whole atlas: where the embedding is wrong
            zs = sorted(set(zs) | set(range(options["sweep_step"] // 2, self.n, options["sweep_step"])))
        pairs = _stage1(coarse, coarse_atlas, mask, zs, options)
        _check(progress)
        if options["stage1_prune"] is None:
            first = coarse.score(pairs, self.n, best_per_cut_z=True)  # hypotheses need no more
        else:
            first, pairs = _pruned_stage1(coarse, pairs, shortlist, options, self.n, progress)
        hyps = hypotheses(first, shortlist, options)
        refined = _refined(hyps, shortlist, options)
        if refined:  # the best swept plates' neighbours too, the starts again
            found, more, extra = _refine_sweep(
                coarse, coarse_atlas, mask, first, shortlist, zs, options, self.n
            )
            first, pairs, zs = first + found, pairs + more, sorted(set(zs) | set(extra))
            _check(progress)
            hyps = hypotheses(first, shortlist, options)
            refined = bool(more)  # recorded only where a plate was scored (review 2 of session 34, C2)
        densified = _outscored(hyps, shortlist, options)
        if densified:  # the sweep outscored the shortlist: every dense_sweep-th plate in stage 1 too
            short = _around(shortlist, options["neighbours"], self.n)
            dense = sorted(
                set(short) | set(range(options["dense_sweep"] // 2, self.n, options["dense_sweep"]))
            )
            scored = set(zs)
            extra = [z for z in dense if z not in scored]  # the plates not scored yet
            more = _stage1(coarse, coarse_atlas, mask, extra, options)
            _check(progress)
            found = coarse.score(more, self.n, best_per_cut_z=True)
            pairs += more
            if options["dense_mode"] == "add":  # the starts kept; new ones on the new plates, apart from
                # each other and from every start that stage 1 scored at least as well (a weaker start near
                # a new plate's better pose refines its own pose, not the new one's)
                gap = options["hypothesis_gap"]
                new = [p for p in found if _apart(p, [h for h in hyps if h.score >= p.score], gap)]
                hyps = hyps + _distinct(new, options["dense_starts"], gap)
                zs = sorted(set(zs) | set(extra))
                first = first + found
            else:  # "replace": as the search with sweep_step dense_sweep (the first sweep's other plates out)
                by_plate = {p.plate: p for p in first + found}
                zs = dense
                first = [by_plate[z] for z in zs if z in by_plate]
                hyps = hypotheses(first, shortlist, options)
        start = _route(first, hyps, order, options)
        routed = start is not None
        if routed:  # stage 1 placed the section clearly: its best start alone
            hyps = [start]
        # stage 2 starts from stage 1's shifts: its cuts are centred there and searched nearby
        reach = round(LOCAL_REACH * options["work_size"])
        fine = SectionGrid(
            grey,
            mask,
            options["work_size"],
            reach=reach,
            blur=options["edge_blur"],
            outside=options["outside_weight"],
            **band,
            canvas=CANVAS if options["stage2_canvas"] is None else options["stage2_canvas"],
        )
        refine = _Refine(self.atlas(options["work_size"]), fine, options, progress)
        bests, own = _untilted_all(refine, hyps, options["own_plate_tilt"])
        top = max((b.score for b in bests), default=0.0)
        shared = _tilt_near_top(refine, bests, options["tilt_margin"], top, options["tilt_share"])[1]
        own_tilts = _tilt_near_top(refine, own, options["tilt_margin"], top)[0]
        scan_count = 1 if routed else options["z_scan_poses"]
        scanned = _distinct(refine.poses, scan_count) if options["z_scan"] > 0 else []
        for start in scanned:
            refine.z_scan(start, options["z_scan"])
        weight = _prior_weight(order, options)
        prior = _prior(order, self.n) * weight
        pairs_done = len(pairs)
        widened = _far_from(refine.poses, prior, shortlist, options["widen_gap"]) or _weak(
            refine.poses, options["widen_score"]
        )
        kept = False
        if widened:  # the search failed (no pose above widen_score, or far from the shortlist)
            before = len(refine.poses)
            more, own_more, more_shared = self._widen(
                coarse, coarse_atlas, mask, zs, first, hyps, refine, scanned, options
            )
            pairs_done += more
            shared += more_shared
            own_tilts += own_more
            # the second pass's poses count only where one ranks before the first pass's best: a
            # wrong region it adds would otherwise push the truth further down (docs/atlas.md)
            kept = bool(_value(refine.poses[before:], prior) > _value(refine.poses[:before], prior))
            if not kept:
                del refine.poses[before:]
        poses = refine.poses
        if options["region_refine"] > 0 and poses:
            poses = self._region_refine(grey, mask, fine.tissue_centre, poses, options)
        if options["aspects"] and poses:
            poses = poses + refine.aspects(poses, prior)
        if options["information_weight"] > 0 and poses:
            _inform(poses, prior, fine, refine.atlas, options)
        if options["region_weight"] > 0 and poses and self._plates.has_labels:
            samples = SectionSamples(grey, mask, fine.tissue_centre, size=REGION_FIT_SIZE)
            _regions_score(poses, prior, self.regions(), samples, options)
        moved = 0  # a list of 2D plates has no plate axis: nothing moves (result.quarter_moved says so)
        reading = is_open = None
        if options["quarter_shift"] > 0 and poses and self.is_volume:
            gate = options["quarter_gate"]
            if gate is not None:  # the section's stain read at the best pose (NaN: a number's gate shuts)
                reading = _stain_reading(poses, prior, fine, refine.atlas, bright)
                is_open = bool(bright == refine.atlas.bright if gate == "polarity" else reading > gate)
            if gate is None or is_open:
                moved = _quarter_shift(poses, prior, fine, refine.atlas, options, self.n)
        for p in poses:
            p.scale *= zoom
        result = _rank(
            poses,
            order,
            options["plate_penalty"],
            pairs_done + refine.pairs,
            self.n,
            prior,
            options["penalty_reach"],
            options["plain_reach"],
        )
        result.widened, result.widen_kept = widened, kept
        result.stage1_pairs = pairs_done
        result.tilts_shared = shared
        result.densified = densified
        result.routed = routed
        result.refined = refined
        result.prior_weight = weight
        result.own_plate_tilts = own_tilts
        result.quarter_moved = moved
        result.quarter_reading = reading
        result.quarter_open = is_open
        result.options = dict(options)
        return result

    def _widen(
        self, coarse, coarse_atlas, mask, zs, first, hyps, refine, scanned, options
    ) -> tuple[int, int, int]:
        """The second pass: stage 1 on every plate not yet searched, stage 2 on the best distinct
        stage-1 poses away from the first pass's hypotheses, scanned along the plate axis where
        apart from the first pass's scans. Returns stage 1's pair count (stage 2's are in ``refine``),
        how many tilt searches ``own_plate_tilt`` added and how many ``tilt_share`` shared."""
        searched = set(zs)
        rest = [z for z in range(self.n) if z not in searched]
        more = _stage1(coarse, coarse_atlas, mask, rest, options) if rest else []
        _check(refine.progress)
        found = coarse.score(more, self.n, best_per_cut_z=True)
        new = _distinct(
            [p for p in first + found if _apart(p, hyps)], options["hypotheses"], options["hypothesis_gap"]
        )
        top = max((p.score for p in refine.poses), default=0.0)
        bests, own = _untilted_all(refine, new, options["own_plate_tilt"])
        shared = _tilt_near_top(refine, bests, options["tilt_margin"], top, options["tilt_share"])[1]
        own_tilts = _tilt_near_top(refine, own, options["tilt_margin"], top)[0]
        if options["z_scan"] > 0:
            for start in _distinct(refine.poses, options["z_scan_poses"]):
                if _apart(start, scanned):
                    refine.z_scan(start, options["z_scan"])
        return len(more), own_tilts, shared


def stage1_pairs(
    coarse: SectionGrid,
    coarse_atlas,
    mask: np.ndarray,
    zs,
    scale_step: float,
    max_rotation: float,
    rotation_step: float,
) -> list:
    """Stage 1's ``(rotation, scale, cut)`` pairs: the untilted plates ``zs`` at the scales near each
    one's extent ratio to the section's tissue ``mask``, each at every rotation step."""
    guess = (extent(mask)[None, :] / coarse_atlas.extents[zs]).max(axis=1)  # section px per plate px
    scales = grid_scales(coarse.q, MIN_SCALE_FACTOR * guess.min(), MAX_SCALE_FACTOR * guess.max(), scale_step)
    rotations = _steps(max_rotation, rotation_step)
    pairs = []
    for z, g in zip(zs, guess, strict=True):
        for s in scales:
            if MIN_SCALE_FACTOR * g / scale_step**0.5 <= s <= MAX_SCALE_FACTOR * g * scale_step**0.5:
                cut = coarse.plate_cut(coarse_atlas, z, s)
                pairs += [(r, s, cut) for r in rotations]
    return pairs


def _pruned_stage1(coarse: SectionGrid, pairs: list, shortlist: list[int], options: dict, n: int, progress):
    """Stage 1 in two passes (``stage1_prune``): every plate's pairs at rotation 0, then the other
    rotations of the plates whose rotation-0 best could still make a start of stage 2: the anchors'
    plates and the ``hypotheses`` best by their rotation-0 best, then, ``hypotheses`` plates at a time
    in that order, every plate whose rotation-0 best lies within ``stage1_prune`` of the weakest of the
    ``hypotheses`` distinct starts chosen from the plates scored in full so far (all of them while
    fewer starts are chosen). Returns each plate's best pose (a plate not scored in
    full: its rotation-0 best, below every start) and the pairs scored. Stage 2's starts are those of
    the full stage 1 wherever no plate left out would have scored above the weakest start in full."""
    zero = [p for p in pairs if p[0] == 0.0]
    rest: dict[float, list] = {}
    for p in pairs:
        if p[0] != 0.0:
            rest.setdefault(p[2].z, []).append(p)
    if not zero or not rest:  # no rotation 0, or nothing else: one pass
        return coarse.score(pairs, n, best_per_cut_z=True), pairs
    best, close = _rotation0(coarse, zero, n, options)
    proxy = {z: p.score for z, p in best.items()}
    rest = _near_scales(rest, best, options, close)
    ranked = sorted(proxy, key=lambda z: -proxy[z])  # stable: ties in the plates' order
    count = options["hypotheses"]
    want = {float(z) for z in shortlist[: options["anchors"]] if float(z) in proxy} | set(ranked[:count])
    done: set[float] = set()
    used = list(zero)
    while want:
        more = [p for z in sorted(want) for p in rest.get(z, [])]
        _check(progress)
        poses, more = _second_pass(coarse, more, best, options, n)
        for pose in poses:
            if pose.score > best[pose.z].score:
                best[pose.z] = pose
        used += more
        done |= want
        full = [best[z] for z in proxy if z in done]
        starts = _distinct(full, count, options["hypothesis_gap"])
        floor = starts[-1].score if len(starts) == count else -np.inf
        # the next few plates by their rotation-0 best (a small batch: the floor rises as plates come)
        want = {z for z in ranked if z not in done and proxy[z] + options["stage1_prune"] >= floor}
        want = set(sorted(want, key=lambda z: -proxy[z])[:count])
    return [best[z] for z in proxy], used


def _refine_sweep(
    coarse, coarse_atlas, mask, first: list, shortlist: list[int], zs: list[int], options: dict, n: int
):
    """Stage 1 on the plates within ``neighbours`` of the ``sweep_refine`` best plates of ``first``
    outside the shortlisted plates (each of ``shortlist`` and ``neighbours`` each side), those not
    scored yet: each at rotation 0 and, with ``stage1_prune``, at the other rotations only where its
    rotation-0 best lies within ``stage1_prune`` of the weakest of stage 2's ``hypotheses`` distinct
    starts from ``first`` (every rotation without it). Returns (each new plate's best pose, the pairs
    scored, the new plates)."""
    near = set(_around(shortlist, options["neighbours"], n))
    swept = sorted((p for p in first if p.plate not in near), key=lambda p: -p.score)
    best = [p.plate for p in swept[: options["sweep_refine"]]]
    scored = set(zs)
    extra = [z for z in _around(best, options["neighbours"], n) if z not in scored]
    pairs = _stage1(coarse, coarse_atlas, mask, extra, options) if extra else []
    if not pairs:
        return [], [], []
    if options["stage1_prune"] is None:
        return coarse.score(pairs, n, best_per_cut_z=True), pairs, extra
    zero = [p for p in pairs if p[0] == 0.0]
    found, close = _rotation0(coarse, zero, n, options)
    starts = _distinct(first, options["hypotheses"], options["hypothesis_gap"])
    floor = starts[-1].score if len(starts) == options["hypotheses"] else -np.inf
    want = {z for z, p in found.items() if p.score + options["stage1_prune"] >= floor}
    rest: dict[float, list] = {}
    for p in pairs:
        if p[0] != 0.0 and p[2].z in want:
            rest.setdefault(p[2].z, []).append(p)
    more = [p for ps in _near_scales(rest, found, options, close).values() for p in ps]
    poses, more = _second_pass(coarse, more, found, options, n)
    for pose in poses:
        if pose.score > found[pose.z].score:
            found[pose.z] = pose
    return list(found.values()), zero + more, extra


def _second_pass(coarse: SectionGrid, more: list, best: dict, options: dict, n: int) -> tuple[list, list]:
    """Stage 1's second-pass pairs ``more`` (rotations other than 0) scored: each plate position's best
    pose (first seen among equals) and the pairs scored. With ``stage1_rotation_climb`` (session 46,
    opt-in) each plate's rotations are scored outward from 0 one step at a time on each side, the next
    step only where the last one scored above every rotation nearer 0 on that side and 0's best
    (``best``, each plate's rotation-0 best pose): an in-plane turn that loses at 7.5 degrees is not
    tried at 15 (module docstring, "Rotation climb"). Without it every pair, as before."""
    if not options["stage1_rotation_climb"] or not more:
        return coarse.score(more, n, best_per_cut_z=True), more
    steps: dict[tuple, dict[float, list]] = {}  # (plate position, side) -> {turn: pairs}
    for pair in more:
        steps.setdefault((pair[2].z, pair[0] > 0), {}).setdefault(abs(pair[0]), []).append(pair)
    floor = {key: best[key[0]].score for key in steps}
    turns = {key: sorted(by) for key, by in steps.items()}
    active, level, used = list(steps), 0, []
    found: dict[float, Pose] = {}
    while active:
        batch = [pair for key in active for pair in steps[key][turns[key][level]]]
        poses = coarse.score(batch, n)
        top: dict[tuple, float] = {}
        for pair, pose in zip(batch, poses, strict=True):
            key = (pair[2].z, pair[0] > 0)
            top[key] = max(top.get(key, -np.inf), pose.score)
            if pose.z not in found or pose.score > found[pose.z].score:
                found[pose.z] = pose
        used += batch
        level += 1
        active = [key for key in active if top[key] > floor[key] and level < len(turns[key])]
        for key in active:
            floor[key] = top[key]
    return list(found.values()), used


def _rotation0(
    coarse: SectionGrid, zero: list, n: int, options: dict
) -> tuple[dict[float, Pose], set | None]:
    """Stage 1's rotation-0 pairs ``zero`` scored: each plate position's best pose (first seen among equals,
    as :meth:`SectionGrid.score`'s ``best_per_cut_z``) and, with ``stage1_scale_margin``, the ids of the
    cuts (plate and scale) whose rotation-0 pose scores within that margin of their plate's best (None
    without it)."""
    margin = options["stage1_scale_margin"]
    if margin is None:
        return {p.z: p for p in coarse.score(zero, n, best_per_cut_z=True)}, None
    poses = coarse.score(zero, n)
    best: dict[float, Pose] = {}
    for pose in poses:
        if pose.z not in best or pose.score > best[pose.z].score:
            best[pose.z] = pose
    close = {
        id(pair[2])
        for pair, pose in zip(zero, poses, strict=True)
        if pose.score >= best[pose.z].score - margin
    }
    return best, close


def _near_scales(
    rest: dict[float, list], best: dict[float, Pose], options: dict, close: set | None = None
) -> dict[float, list]:
    """Stage 1's second-pass pairs ``rest`` (per plate position) at the scales within
    ``stage1_scale_reach`` steps of ``scale_step`` of the plate's rotation-0 best pose in ``best``
    (every pair where the option is None, or where a plate has no such pose): the section's anatomy is
    as large against the plate at every in-plane turn the search tries (session 43, opt-in). ``close``
    (``stage1_scale_margin``, session 44): the ids of further cuts kept at every rotation."""
    reach = options["stage1_scale_reach"]
    if reach is None:
        return rest
    bound = (reach + 0.5) * math.log(options["scale_step"])  # half a step of slack: the grid's rounding
    return {
        z: [
            p
            for p in ps
            if z not in best
            or abs(math.log(p[1] / best[z].scale)) <= bound
            or (close is not None and id(p[2]) in close)
        ]
        for z, ps in rest.items()
    }


def _refined(hyps: list[Pose], shortlist: list[int], options: dict) -> bool:
    """Whether ``sweep_refine`` runs: it is on, there is a sweep, and at least ``sweep_outside`` of
    stage 2's starts ``hyps`` lie outside the shortlisted plates (each of ``shortlist`` and
    ``neighbours`` on each side)."""
    if options["sweep_refine"] <= 0 or options["sweep_step"] <= 0:
        return False
    near = set(_around(shortlist, options["neighbours"], 10**9))
    return sum(h.plate not in near for h in hyps) >= options["sweep_outside"]


def coarse_grid(
    grey: np.ndarray,
    mask: np.ndarray,
    coarse_size: int,
    blur: float = 0.0,
    outside: float = 0.0,
    spare: np.ndarray | None = None,
    free: float = 0.0,
    lattice_margin: float | None = None,
) -> SectionGrid:
    """Stage 1's grid of a section: every shift that does not wrap around is searched (27 canvas
    pixels per axis at the default ``coarse_size`` 32, a 72-pixel FFT). A partial section whose tissue
    centre lies 20-22 pixels from the plate's tissue-box centre still keeps the
    :data:`~.pose_grid.MIN_OVERLAP` on the slice there, and stage 2 searches only near stage 1's
    poses, so a shorter reach loses such poses for good. Session 13 tried 19 pixels (a 64-pixel FFT,
    ~18 % less CPU, the same ranks on the phantom benchmark's sections) and went back: that saving was
    measured on the phantom alone."""
    grid = SectionGrid(grey, mask, coarse_size, blur=blur, outside=outside, spare=spare, free=free)
    grid.lattice_margin = lattice_margin  # the stage1_lattice_margin rerank option (session 46)
    return grid


class _Refine:
    """Stage 2 on the fine grid: poses around stage-1 hypotheses."""

    def __init__(self, atlas: AtlasGrid, grid: SectionGrid, options: dict, progress):
        self.atlas, self.grid = atlas, grid
        self.options, self.progress = options, progress
        self.poses: list[Pose] = []
        self.pairs = 0
        self.rot_step = options["rotation_step"] / 2
        self.scale_step = options["scale_step"] ** 0.5

    def _score(self, pairs: list) -> Pose:
        _check(self.progress)
        found = self.grid.score(pairs, self.atlas.n)
        self.poses += found
        self.pairs += len(pairs)
        return max(found, key=lambda p: p.score)

    def _rotations(self, pose: Pose) -> list[float]:
        limit = self.options["max_rotation"] + 1e-9
        return [
            pose.rotation + d * self.rot_step
            for d in (-1, 0, 1)
            if abs(pose.rotation + d * self.rot_step) <= limit
        ]

    def _scales(self, pose: Pose) -> list[float]:
        return [pose.scale * self.scale_step**d for d in (-1, 0, 1)]

    def _finer_tilts(self, top: Pose) -> list[tuple[float, float]]:
        """The half-step tilt grid around ``top``'s tilt (itself left out), within ``max_tilt``."""
        half = self.options["tilt_step"] / 2
        limit = self.options["max_tilt"] + 1e-9
        return [
            (top.tilt[0] + dp, top.tilt[1] + dy)
            for dp in (-half, 0.0, half)
            for dy in (-half, 0.0, half)
            if (dp, dy) != (0.0, 0.0) and abs(top.tilt[0] + dp) <= limit and abs(top.tilt[1] + dy) <= limit
        ]

    def _turn_and_scale(self, top: Pose) -> Pose:
        """Rotation and scale one step each way around a tilted pose, at its tilt; the best pose."""
        a, g = self.atlas, self.grid
        pairs = []
        for s in self._scales(top):
            cut = g.oblique_cut(a, top.z, top.tilt, np.asarray(top.centre), s)
            pairs += [(r, s, cut) for r in self._rotations(top) if (r, s) != (top.rotation, top.scale)]
        return max([top, self._score(pairs)], key=lambda p: p.score) if pairs else top

    def untilted(self, hyp: Pose) -> Pose:
        """The best pose on the plates near a stage-1 hypothesis, untilted, near its rotation and scale.
        With ``untilted_prune``: each cut at the hypothesis's rotation first, the other rotations only
        on the cuts that scored within that much of the best of those. With ``untilted_scale_prune``
        (which needs ``untilted_prune``): that first pass cuts each plate at the hypothesis's scale
        first, the scales either side only on the plates that scored within that much of the best."""
        a, g = self.atlas, self.grid
        cuts = []
        offset = np.asarray(hyp.centre) - a.centres[hyp.plate]  # from the plate's tissue box centre
        reach = self.options["untilted_reach"]
        plates = _around([hyp.plate], REFINE_PLATES if reach is None else reach, a.n)
        if self.options["untilted_scale_prune"] is not None:
            return self._untilted_by_scale(hyp, plates, offset)
        for z in plates:
            for s in self._scales(hyp):
                cuts.append((s, g.plate_cut(a, z, s, pivot=a.centres[z] + offset)))
        rotations = self._rotations(hyp)
        margin = self.options["untilted_prune"]
        if margin is None or len(rotations) == 1:
            return self._score([(r, s, cut) for s, cut in cuts for r in rotations])
        top = self._score([(hyp.rotation, s, cut) for s, cut in cuts])
        first = self.poses[-len(cuts) :]
        return self._other_rotations(hyp, rotations, cuts, first, top)

    def _other_rotations(self, hyp: Pose, rotations, cuts, first: list[Pose], top: Pose) -> Pose:
        """``untilted_prune``'s second pass: the rotations other than ``hyp``'s on the ``cuts`` whose
        poses at ``hyp``'s rotation (``first``) scored within the margin of ``top``; the best pose."""
        margin = self.options["untilted_prune"]
        more = [
            (r, s, cut)
            for (s, cut), pose in zip(cuts, first, strict=True)
            if pose.score >= top.score - margin
            for r in rotations
            if r != hyp.rotation
        ]
        return max([top, self._score(more)], key=lambda p: p.score) if more else top

    def _untilted_by_scale(self, hyp: Pose, plates: list[int], offset: np.ndarray) -> Pose:
        """:meth:`untilted` with ``untilted_scale_prune`` (session 45, opt-in): each plate cut at the
        hypothesis's scale and scored at its rotation, the scales either side cut only on the plates
        scoring within ``untilted_scale_prune`` of the best of those; then ``untilted_prune``'s other
        rotations on every cut made (:meth:`_other_rotations`)."""
        a, g = self.atlas, self.grid

        def cut(z: int, s: float):
            return (s, g.plate_cut(a, z, s, pivot=a.centres[z] + offset))

        cuts = [cut(z, hyp.scale) for z in plates]
        top = self._score([(hyp.rotation, s, c) for s, c in cuts])
        first = list(self.poses[-len(cuts) :])
        margin = self.options["untilted_scale_prune"]
        near = [z for z, pose in zip(plates, first, strict=True) if pose.score >= top.score - margin]
        others = [cut(z, s) for z in near for s in self._scales(hyp) if s != hyp.scale]
        if others:
            top = max([top, self._score([(hyp.rotation, s, c) for s, c in others])], key=lambda p: p.score)
            first += self.poses[-len(others) :]
            cuts += others
        rotations = self._rotations(hyp)
        if len(rotations) == 1:
            return top
        return self._other_rotations(hyp, rotations, cuts, first, top)

    def tilted(self, best: Pose, shared: tuple[float, float] | None = None) -> bool:
        """Tilted cuts around the untilted best pose of a hypothesis, then rotation and scale again;
        whether any ran (none on a plate stack or with ``max_tilt`` 0). The joint grid's best tilt is
        kept in :attr:`joint_tilt`. ``shared`` (``tilt_share``; joint search only): no joint grid, the
        finer grid is centred on this tilt (itself cut too, unless untilted) at ``best``'s plate, atlas
        point, rotation and scale, and the search goes on from the best of those and ``best``."""
        a, g = self.atlas, self.grid
        self.joint_tilt = None
        if not (a.is_volume and self.options["max_tilt"] > 0):
            return False
        angles = [t for t in _steps(self.options["max_tilt"], self.options["tilt_step"]) if t != 0]

        def cuts(tilts, at: Pose = best, dzs=(-1, 0, 1)):
            specs = [(at.z + dz, t) for t in tilts for dz in dzs if 0 <= at.z + dz <= a.n - 1]
            found = g.oblique_cuts(a, specs, np.asarray(at.centre), at.scale)
            return [(at.rotation, at.scale, cut) for cut in found]

        if self.options["tilt_search"] == "joint" and shared is not None:
            top = best
            margin = self.options["finer_margin"]
            if margin is not None and top.score < max(p.score for p in self.poses) - margin:
                return True  # as below: far below the best pose so far
            centre = replace(best, tilt=(float(shared[0]), float(shared[1])))
            finer = ([] if centre.tilt == (0.0, 0.0) else [centre.tilt]) + self._finer_tilts(centre)
            reach = self.options["share_finer_reach"]
            dzs = FINE_DZ if reach is None else tuple(range(-reach, reach + 1))
            if finer:
                top = max([top, self._score(cuts(finer, top, dzs))], key=lambda p: p.score)
        elif self.options["tilt_search"] == "joint":
            if self.options["tilt_climb"]:
                top = self._climb(best, [0.0, *angles], lambda tilts: cuts(tilts, dzs=JOINT_DZ))
            else:
                grid = [(p, y) for p in [0.0, *angles] for y in [0.0, *angles] if (p, y) != (0.0, 0.0)]
                tilted = self._score(cuts(grid, dzs=JOINT_DZ))
                top = max([best, tilted], key=lambda p: p.score)
            self.joint_tilt = top.tilt
            margin = self.options["finer_margin"]
            if margin is not None and top.score < max(p.score for p in self.poses) - margin:
                return True  # far below the best pose so far: no finer grid, rotation and scale or rounds
            finer = self._finer_tilts(top)
            if finer:
                top = max([top, self._score(cuts(finer, top, FINE_DZ))], key=lambda p: p.score)
        else:
            pitched = self._score(cuts([(t, 0.0) for t in angles]))
            pitch = pitched.tilt[0] if pitched.score > best.score else 0.0
            turned = self._score(cuts([(pitch, t) for t in angles]))
            top = max([best, pitched, turned], key=lambda p: p.score)
        tilted_at = top  # the rotation and scale the tilt grids ran at
        top = self._turn_and_scale(top)
        for _ in range(self.options["tilt_rounds"] - 1):
            # the tilt again at the new rotation and scale (an oblique cut's untilted best turns and
            # scales the plate to fit, so the first tilt grid ran at a biased rotation and scale); where
            # neither moved, the same grid would find the same tilt
            if (top.rotation, top.scale) == (tilted_at.rotation, tilted_at.scale):
                break
            tilted_at = top
            finer = self._finer_tilts(top)
            if not finer:
                break
            again = max([top, self._score(cuts(finer, top, FINE_DZ))], key=lambda p: p.score)
            if again is top:
                break
            top = self._turn_and_scale(again)
        return True

    def _climb(self, best: Pose, angles: list[float], cuts) -> Pose:
        """The joint pitch x yaw grid ``angles`` x ``angles`` climbed from the untilted ``best``: the
        grid's tilts one step around the best pose so far (each cut once), until none of them scores
        above it; the best pose (``best`` where no tilt beats it). ``cuts(tilts)``: those tilts' pairs."""
        top, at, seen = best, (0, 0), {(0, 0)}
        index = {round(t / self.options["tilt_step"]): t for t in angles}
        while True:
            ring = [(at[0] + i, at[1] + j) for i in (-1, 0, 1) for j in (-1, 0, 1)]
            ring = [k for k in ring if k not in seen and k[0] in index and k[1] in index]
            if not ring:
                return top
            seen.update(ring)
            found = self._score(cuts([(index[i], index[j]) for i, j in ring]))
            if found.score <= top.score:
                return top
            top = found
            at = (
                round(found.tilt[0] / self.options["tilt_step"]),
                round(found.tilt[1] / self.options["tilt_step"]),
            )

    def z_scan(self, best: Pose, reach: int) -> None:
        """Cuts at every plate within ``reach`` of a stage-2 pose, at its tilt, rotation and scale
        through the same atlas point (its shift searched again nearby): the tilt search ran at the
        hypothesis's plate only, so plates a few away are otherwise compared only untilted."""
        a, g = self.atlas, self.grid
        centre = np.asarray(best.centre)
        if a.is_volume:
            specs = [
                (best.z + d, best.tilt) for d in range(-reach, reach + 1) if d and 0 <= best.z + d <= a.n - 1
            ]
            cuts = g.oblique_cuts(a, specs, centre, best.scale)
        else:  # a list of plates: the same offset from each plate's tissue box centre
            offset = centre - a.centres[best.plate]
            plates = _around([best.plate], reach, a.n)
            cuts = [
                g.plate_cut(a, z, best.scale, pivot=a.centres[z] + offset) for z in plates if z != best.plate
            ]
        if cuts:
            self._score([(best.rotation, best.scale, cut) for cut in cuts])

    def aspects(self, poses: list[Pose], prior: np.ndarray) -> list[Pose]:
        """The best pose of each plate within ``aspect_margin`` of the best pose (score less prior)
        cut again at each of the ``aspects`` ratios, at its tilt, rotation, scale and atlas point (its
        shift searched again nearby): the new poses (:attr:`Pose.aspect` set). A specimen is rarely
        the atlas's shape: stretched along one axis against the other, its best plate at one aspect
        can be outscored by a neighbour whose outline fits that stretch. With ``aspect_max_tilt``, a
        pose tilted by more than that about either axis is not cut again: a tilt about one axis also
        shortens the cut along the other, so there a stretch could stand in for a tilt."""
        a, g = self.atlas, self.grid
        best = _best_near_top(poses, prior, self.options["aspect_margin"])
        limit = self.options["aspect_max_tilt"]
        pairs = []
        for k in best.values():
            pose = poses[k]
            if limit is not None and max(abs(t) for t in pose.tilt) > limit + 1e-9:
                continue
            centre = np.asarray(pose.centre, dtype=np.float64)
            for ratio in self.options["aspects"]:
                if a.is_volume:
                    cut = g.oblique_cuts(a, [(pose.z, pose.tilt)], centre, pose.scale, ratio)[0]
                else:
                    cut = g.plate_cut(a, pose.plate, pose.scale, pivot=centre, aspect=ratio)
                pairs.append((pose.rotation, pose.scale, cut))
        _check(self.progress)
        found = g.score(pairs, a.n)
        self.pairs += len(pairs)
        return found


def _best_near_top(poses: list[Pose], prior: np.ndarray, margin: float) -> dict[int, int]:
    """``{plate: index}`` of the best pose (score less prior) of each plate whose best lies within
    ``margin`` of the best pose."""
    value = np.array([p.score for p in poses]) - prior[np.array([p.plate for p in poses])]
    top = float(value.max())
    best: dict[int, int] = {}
    for k, p in enumerate(poses):
        if value[k] >= top - margin and (p.plate not in best or value[k] > value[best[p.plate]]):
            best[p.plate] = k
    return best


def grid_scales(q: float, low: float, high: float, ratio: float) -> list[float]:
    """Scales (section pixels per plate pixel) from about ``low`` to ``high`` whose plate pixels per
    canvas pixel ``q / scale`` lie on the fixed grid ``ratio ** k``: atlas cuts are then the same
    for every section of a similar size (cached by :class:`.pose_grid.AtlasGrid`)."""
    k0 = math.floor(math.log(q / high) / math.log(ratio) + 1e-9)
    k1 = math.ceil(math.log(q / low) / math.log(ratio) - 1e-9)
    return [q / ratio**k for k in range(k1, k0 - 1, -1)]


def _check(progress) -> None:
    if progress is not None:
        progress.check()


def _around(plates: list[int], reach: int, n: int) -> list[int]:
    out: set[int] = set()
    for p in plates:
        out.update(range(max(0, p - reach), min(n, p + reach + 1)))
    return sorted(out)


def _distinct(poses: list[Pose], count: int, gap: float = HYPOTHESIS_GAP) -> list[Pose]:
    chosen: list[Pose] = []
    for p in sorted(poses, key=lambda q: -q.score):
        if len(chosen) >= count:
            break
        if _apart(p, chosen, gap):
            chosen.append(p)
    return chosen


def _apart(pose: Pose, others: list[Pose], gap: float = HYPOTHESIS_GAP) -> bool:
    return all(abs(pose.z - o.z) >= gap for o in others)


def _stage1(coarse, coarse_atlas, mask, zs: list[int], options: dict) -> list:
    """Stage 1's pairs on plates ``zs`` with the scale and rotation grid of ``options``."""
    return stage1_pairs(
        coarse,
        coarse_atlas,
        mask,
        zs,
        options["scale_step"],
        options["max_rotation"],
        options["rotation_step"],
    )


def _tilt_near_top(
    refine, bests: list[Pose], margin: float | None, top: float, share: int | None = None
) -> tuple[int, int]:
    """Tilt-search each of ``bests`` (untilted stage-2 poses) scoring within ``margin`` of ``top``
    (``margin`` None: every one); how many tilt searches ran, and how many of them ``share``
    (``tilt_share``) started from another's joint-grid tilt. With ``share``, the poses that lie within
    ``share`` plates of a better one of those searched (taken best first, ties in list order) follow
    the others, each from the joint-grid tilt of the best such one (:func:`_leaders`)."""
    chosen = [b for b in bests if margin is None or b.score >= top - margin]
    if share is None:
        return sum(refine.tilted(best) for best in chosen), 0
    leader = _leaders(chosen, share)
    ran, shared, tilts = 0, 0, {}
    for k in [k for k in range(len(chosen)) if leader[k] == k]:
        ran += refine.tilted(chosen[k])
        tilts[k] = refine.joint_tilt
    for k in [k for k in range(len(chosen)) if leader[k] != k]:
        start = tilts.get(leader[k])
        ran += refine.tilted(chosen[k], start)
        shared += start is not None
    return ran, shared


def _leaders(bests: list[Pose], reach: int) -> list[int]:
    """For each of ``bests``, the index of the best one within ``reach`` plates of it that leads a
    region (itself where none better lies that close): taken best first (ties in list order), a pose
    leads where no leader found so far lies within ``reach`` plates; the others follow the best leader
    within ``reach`` (``tilt_share``)."""
    leader = list(range(len(bests)))
    heads: list[int] = []
    for k in sorted(range(len(bests)), key=lambda k: -bests[k].score):  # stable
        near = [j for j in heads if abs(bests[k].plate - bests[j].plate) <= reach]
        if near:
            leader[k] = near[0]  # heads are in descending score order: the best leader near it
        else:
            heads.append(k)
    return leader


def _untilted_all(refine, hyps: list[Pose], own_plate: bool) -> tuple[list[Pose], list[Pose]]:
    """The untilted best pose of each hypothesis (:meth:`_Refine.untilted`) and, with ``own_plate``
    (``own_plate_tilt``), for each hypothesis whose best lies on another plate, the best untilted pose
    on the hypothesis's own plate (of the poses that step scored; empty without ``own_plate``)."""
    bests, own = [], []
    for hyp in hyps:
        before = len(refine.poses)
        best = refine.untilted(hyp)
        bests.append(best)
        if own_plate and best.plate != hyp.plate:
            mine = [p for p in refine.poses[before:] if p.plate == hyp.plate]
            own += [max(mine, key=lambda p: p.score)] if mine else []
    return bests, own


def _inform(poses: list[Pose], prior: np.ndarray, grid: SectionGrid, atlas: AtlasGrid, options: dict) -> None:
    """Each plate whose best pose (score less prior) lies within ``information_margin`` of the best
    pose gains ``information_weight`` times the mutual information at that pose over the least such
    plate's, on the score of every pose of the plate (:attr:`Pose.info` set on the pose measured).
    Only those plates move, none of them below where it was against the rest; ``plain`` is left as
    it was, so ``plain_reach`` still orders the plates next to the best pose by the edges alone."""
    best = _best_near_top(poses, prior, options["information_margin"])
    info = {plate: grid.information(atlas, poses[k]) for plate, k in best.items()}
    _lift(poses, best, info, options["information_weight"], "info")


def _stain_reading(
    poses: list[Pose], prior: np.ndarray, grid: SectionGrid, atlas: AtlasGrid, section_bright: bool
) -> float:
    """The ``quarter_gate`` reading (:attr:`RerankResult.quarter_reading`):
    :meth:`.pose_grid.SectionGrid.level_correlation` at the best pose (score less prior), before any
    pose moves."""
    value = np.array([p.score for p in poses]) - prior[np.array([p.plate for p in poses])]
    return grid.level_correlation(atlas, poses[int(np.argmax(value))], section_bright)


def _quarter_shift(
    poses: list[Pose], prior: np.ndarray, grid: SectionGrid, atlas: AtlasGrid, options: dict, n: int
) -> int:
    """The best pose of each plate whose best lies within ``quarter_margin`` of the best pose (score less
    prior) moved along the plate axis by ``quarter_shift`` times the tissue-weighted mean of its quarters'
    best plate offsets (:meth:`.pose_grid.SectionGrid.quarter_offsets`, within ``quarter_reach``);
    its plate follows its ``z`` (within the atlas), its score is kept (the cut's before the move: it is
    not scored again at the new plate), the move is set as :attr:`Pose.shifted`. The ranking
    (:func:`_rank`) then reads each pose at its new ``z`` and plate (the prior too). Returns how many
    poses it set ``shifted`` on (:attr:`RerankResult.quarter_moved`)."""
    best = _best_near_top(poses, prior, options["quarter_margin"])
    moved = 0
    for k in best.values():
        pose = poses[k]
        offsets, areas = grid.quarter_offsets(atlas, pose, options["quarter_reach"])
        if areas.sum() <= 0:
            continue
        move = options["quarter_shift"] * float((offsets * areas).sum() / areas.sum())
        pose.z = float(min(max(pose.z + move, 0.0), n - 1.0))
        pose.plate = int(round(pose.z))
        pose.shifted = move
        moved += 1
    return moved


def _lift(
    poses: list[Pose], best: dict[int, int], values: dict[int, float], weight: float, name: str
) -> None:
    """Every pose of each plate of ``best`` (``{plate: index of its best pose}``) gains ``weight``
    times the plate's value over the least of ``values``; the value is set as attribute ``name`` on
    the plate's best pose."""
    low = min(values.values())
    for plate, k in best.items():
        setattr(poses[k], name, values[plate])
    for p in poses:
        if p.plate in values:
            p.score += weight * (values[p.plate] - low)


def _regions_score(
    poses: list[Pose], prior: np.ndarray, regions: RegionAtlas, samples: SectionSamples, options: dict
) -> None:
    """Each plate whose best pose (score less prior) lies within ``region_margin`` of the best pose
    gains ``region_weight`` times the correlation ratio of the section's intensities given the
    atlas's regions at that pose (with ``region_refit``, at the pose moved to a local maximum of the
    ratio, its plate position fixed) over the least such plate's, on the score of every pose of the
    plate (:attr:`Pose.region` set on the pose measured); ``plain`` is left as it was (as
    :func:`_inform`). Poses are those of the search's grid (scale before the section's zoom)."""
    best = _best_near_top(poses, prior, options["region_margin"])
    ratio = {}
    for plate, k in best.items():
        pose = poses[k]
        if options["region_refit"]:
            fitted = refine_pose(
                regions,
                samples,
                pose,
                options["max_tilt"],
                options["max_rotation"],
                free_z=False,
                halvings=REGION_HALVINGS,
                moves=REGION_MOVES,
            )
            ratio[plate] = float(fitted.score)
        else:
            ratio[plate] = region_ratio(regions, samples, pose)
    _lift(poses, best, ratio, options["region_weight"], "region")


def _value(poses: list[Pose], prior: np.ndarray) -> float:
    """The best score less prior of ``poses`` (-inf for none)."""
    return max((p.score - prior[p.plate] for p in poses), default=-np.inf)


def _weak(poses: list[Pose], threshold: float | None) -> bool:
    """Whether poses were scored and none above ``threshold`` (None: never)."""
    return threshold is not None and bool(poses) and max(p.score for p in poses) < threshold


def _far_from(poses: list[Pose], prior: np.ndarray, plates: list[int], gap: int | None) -> bool:
    """Whether the pose that ranks first (score less prior) lies more than ``gap`` plates from
    every plate of ``plates`` (``gap`` None: never)."""
    if gap is None or not poses or not plates:
        return False
    best = max(poses, key=lambda p: p.score - prior[p.plate])
    return min(abs(best.z - p) for p in plates) > gap


def hypotheses(first: list[Pose], shortlist: list[int], options: dict) -> list[Pose]:
    """Stage 2's starts: the ``hypotheses`` best stage-1 poses ``first`` at least ``hypothesis_gap``
    plates apart, plus the best pose on each of the ``anchors`` first plates of ``shortlist`` that no
    start lies within :data:`HYPOTHESIS_GAP` of."""
    chosen = _distinct(first, options["hypotheses"], options["hypothesis_gap"])
    return _anchored(first, chosen, shortlist[: options["anchors"]])


def _anchored(first: list[Pose], hyps: list[Pose], anchors: list[int]) -> list[Pose]:
    """``hyps`` plus, for each anchor plate no hypothesis lies near, its best stage-1 pose."""
    out = list(hyps)
    for plate in anchors:
        if all(abs(h.z - plate) >= HYPOTHESIS_GAP for h in out):
            own = [p for p in first if p.plate == plate]
            if own:
                out.append(max(own, key=lambda p: p.score))
    return out


def _route(first: list[Pose], hyps: list[Pose], order, options: dict) -> Pose | None:
    """The start stage 2 refines alone where ``route_gap`` routes the section, else None: the best of
    the starts ``hyps`` (with ``dense_mode`` "add" the dense starts come last, not in score order),
    where it scores at least ``route_gap`` above every stage-1 pose of ``first`` more than
    :data:`ROUTE_REACH` plates from it (and, with ``route_agree``, lies within that many plates of the
    first stage's best plate ``order[0]``). No pose that far (a search without a sweep, such as
    :data:`SEEDED`'s): no evidence of a gap, not routed (review 1 of session 32, C1)."""
    gap = options["route_gap"]
    if gap is None or not hyps:
        return None
    top = max(hyps, key=lambda p: p.score)  # review 1 of session 32, C2
    far = [p.score for p in first if abs(p.z - top.z) > ROUTE_REACH]
    if not far or top.score - max(far) < gap:
        return None
    agree = options["route_agree"]
    if agree is not None and order and abs(top.plate - int(order[0][0])) > agree:
        return None
    return top


def _outscored(hyps: list[Pose], shortlist: list[int], options: dict) -> bool:
    """Whether ``dense_sweep`` is on and at least ``dense_outside`` of stage 2's starts ``hyps`` lie
    outside the shortlisted plates (each of ``shortlist`` and ``neighbours`` on each side): stage 1
    found the sweep's plates as good as the embedding's, so its every-``sweep_step``-th plate may
    have passed the truth's region."""
    if options["dense_sweep"] <= 0:
        return False
    near = set(_around(shortlist, options["neighbours"], 10**9))
    return sum(h.plate not in near for h in hyps) >= options["dense_outside"]


def _prior(order, n: int) -> np.ndarray:
    """The first stage's distance of every plate, 0 for its best, 1 for its median and beyond."""
    d = np.full(n, np.inf)
    for p, dist in order:
        d[int(p)] = float(dist)
    d[~np.isfinite(d)] = np.nanmax(np.where(np.isfinite(d), d, np.nan)) if np.isfinite(d).any() else 0.0
    low, mid = float(d.min()), float(np.median(d))
    return np.clip((d - low) / max(mid - low, 1e-12), 0.0, 1.0)


def first_stage_margin(order, reach: int = PRIOR_MARGIN_REACH) -> float:
    """How clearly the first stage places a section: the best distance of the plates more than ``reach``
    plates from its best plate, less its best distance, over its median distance less its best (0: a
    plate elsewhere as close as the best; inf where no plate lies that far)."""
    by_distance = sorted(((int(p), float(d)) for p, d in order), key=lambda e: e[1])
    best, low = by_distance[0]
    far = [d for p, d in by_distance if abs(p - best) > reach]
    if not far:
        return float("inf")
    mid = float(np.median([d for _, d in by_distance]))
    return (min(far) - low) / max(mid - low, 1e-12)


def _prior_weight(order, options: dict) -> float:
    """The prior's weight for this section: ``prior_margin_weight`` where ``prior_margin`` is set and
    the first stage's margin (:func:`first_stage_margin`) reaches it, else ``prior_weight``."""
    threshold = options.get("prior_margin")
    if threshold is not None and order and first_stage_margin(order) >= threshold:
        return options["prior_margin_weight"]
    return options["prior_weight"]


def _plain_near_best(poses, own, z, dist, penalty: float, reach: int, prior) -> np.ndarray:
    """``dist`` with the plates within ``reach`` of the best pose re-spaced by the poses' plain
    scores (see :func:`_rank`)."""
    top = int(np.argmax(own))
    near = np.abs(z - z[top]) <= reach + 1
    plain = np.array([p.plain for p in poses])[near]
    if prior is not None:
        plain = plain - prior[np.array([p.plate for p in poses])[near]]
    plates = np.arange(len(dist))
    window = (np.abs(plates - z[top]) <= reach) | (plates == poses[top].plate)  # never empty
    value = (plain[None, :] - penalty * np.abs(plates[window][:, None] - z[near][None, :])).max(axis=1)
    out = dist.copy()
    out[window] = dist.min() + (value.max() - value)
    return out


def _rank(
    poses: list[Pose],
    order,
    penalty: float,
    pairs: int,
    n: int,
    prior=None,
    reach: int | None = None,
    plain_reach: int | None = None,
) -> RerankResult:
    """Every plate by ``1 - max over poses (score - prior[pose plate] - penalty * min(|z - plate|,
    reach))`` (``reach`` None: no bound), ties in ``order``'s order; without any pose (nothing
    scored), the first stage's plates by their distance (``order`` may be interleaved, not sorted),
    each with ``2 + distance``. ``plain_reach``: the plates within that many of the best pose get the
    best distance plus their gap to the best of them by the same formula on the poses' scores without
    the outside band (:attr:`Pose.plain`), over the poses within ``plain_reach + 1`` of the best
    (None, or no band: unchanged)."""
    if not poses:
        by_distance = sorted(order, key=lambda e: float(e[1]))  # stable: ties keep their order
        return RerankResult([(int(p), 2.0 + float(d)) for p, d in by_distance], {}, pairs)
    plates = np.arange(n)
    z = np.array([p.z for p in poses])
    own = np.array([p.score for p in poses])
    if prior is not None:
        own = own - prior[np.array([p.plate for p in poses])]
    apart = np.abs(plates[:, None] - z[None, :])
    if reach is not None:
        apart = np.minimum(apart, reach)
    value = own[None, :] - penalty * apart
    dist = 1.0 - value.max(axis=1)
    plain_ranked = plain_reach is not None and all(p.plain is not None for p in poses)
    if plain_ranked:
        dist = _plain_near_best(poses, own, z, dist, penalty, plain_reach, prior)
    emb = {int(p): k for k, (p, _) in enumerate(order)}
    ranked = sorted(range(n), key=lambda p: (dist[p], emb.get(p, n)))
    best: dict[int, Pose] = {}
    for p in poses:
        if p.plate not in best or p.score > best[p.plate].score:
            best[p.plate] = p
    return RerankResult([(int(p), float(dist[p])) for p in ranked], best, pairs, plain_ranked=plain_ranked)
